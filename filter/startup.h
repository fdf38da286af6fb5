/* SPDX-License-Identifier: BSD-3-Clause */
/* Getting ready, before any client is served: the dirty bitmap and the
 * disk size fetched (.get_ready), the dirty regions checked against the
 * disk, the view built, the clean clusters discarded, the flusher and
 * the status file started (.after_fork).
 */
#ifndef BACKUPACCESS_FILTER_STARTUP_H
#define BACKUPACCESS_FILTER_STARTUP_H

#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "status.h"
#include "view.h"

/* What start-up learnt and built: written before any client is served,
 * only read while they are, so without a lock (the view locks itself).
 */
struct filter_state {
  uint64_t disk_size;
  bool disk_size_known;
  bool parallel_plugin;         /* the flusher may run beside requests */
  struct ba_view *view;
  struct ba_status *status;     /* the status file's thread */
};

extern struct filter_state state;

int backupaccess_get_ready (int thread_model);
int backupaccess_after_fork (nbdkit_backend *backend);

#endif /* BACKUPACCESS_FILTER_STARTUP_H */
