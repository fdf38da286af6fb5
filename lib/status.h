/* SPDX-License-Identifier: BSD-3-Clause */
/* The status file: a view's counters as one JSON object in a file,
 * rewritten once a second while they change, for backupaccess-helper
 * status (and anyone watching a backup).  Shared by the filter and the
 * mount, which write the same keys.
 */
#ifndef BACKUPACCESS_STATUS_H
#define BACKUPACCESS_STATUS_H

#include <stddef.h>

#include "view.h"

/* Writes the counters to path: a new private file (mode 0600, a name
 * nobody can guess) renamed over it, so that readers see a whole file
 * and a symlink planted at a temporary name is never followed.  Errors
 * are ignored: the status is for watching, never for the backup.
 */
void ba_status_write (const char *path, const struct ba_view_stats *st);

struct ba_status;

/* Starts a thread that writes v's counters to path once a second while
 * they change.  Returns it, or NULL with a message in errbuf.
 */
struct ba_status *ba_status_start (struct ba_view *v, const char *path,
                                   char *errbuf, size_t errlen);

/* Stops the thread after one last write (NULL: nothing). */
void ba_status_stop (struct ba_status *s);

#endif /* BACKUPACCESS_STATUS_H */
