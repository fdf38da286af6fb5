/* SPDX-License-Identifier: BSD-3-Clause */
/* The two ways of setting up snapshot access in QEMU: Proxmox VE's
 * backup access API, and upstream QEMU's own commands.
 */
#ifndef BACKUPACCESS_HELPER_BACKEND_H
#define BACKUPACCESS_HELPER_BACKEND_H

#include <stdbool.h>

#include "options.h"
#include "state.h"

bool proxmox_api_available (void);
const char *preflight_proxmox (const struct setup_opts *o);
void setup_proxmox (struct helper_state *st, const struct setup_opts *o,
                    const char *form);
void setup_upstream (struct helper_state *st, const struct setup_opts *o);

#endif /* BACKUPACCESS_HELPER_BACKEND_H */
