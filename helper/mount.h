/* SPDX-License-Identifier: BSD-3-Clause */
/* mount: the devices as files (backupaccess-mount), for consumers that
 * read files, with their dirty regions.
 */
#ifndef BACKUPACCESS_HELPER_MOUNT_H
#define BACKUPACCESS_HELPER_MOUNT_H

#include <json.h>

#include "state.h"

/* Mounts every device of st not mounted yet (straight on QEMU's
 * export, or through its nbdkit if it is served, without TLS), and adds
 * "mounts" to out: per device its file and dirty regions.
 */
void mount_devices (struct helper_state *st, json_object *out);

/* Unmounts device d (lazily when its file is open), lets its
 * backupaccess-mount send its last discards and stops it, if st records
 * a mount; recorded when done.
 */
void mount_stop (struct helper_state *st, struct device_state *d);

/* Unmounts (lazily) whatever is still mounted in the run directory,
 * and removes the empty mount points: left by a helper killed while it
 * mounted.
 */
void mount_stop_strays (void);

#endif /* BACKUPACCESS_HELPER_MOUNT_H */
