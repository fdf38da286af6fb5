/* SPDX-License-Identifier: BSD-3-Clause */
/* serve: nbdkit with the backupaccess filter and plugin per device. */
#ifndef BACKUPACCESS_HELPER_SERVE_H
#define BACKUPACCESS_HELPER_SERVE_H

#include "options.h"
#include "state.h"

void serve_preflight (const struct serve_opts *so, int ndevs,
                      char **host, int *port, char **user);
struct helper_state *do_serve_state (struct opts *o);
void serve_devices (struct helper_state *st, const struct serve_opts *so);
void report_log (const char *dev, const char *log);

#endif /* BACKUPACCESS_HELPER_SERVE_H */
