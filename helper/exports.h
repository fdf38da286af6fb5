/* SPDX-License-Identifier: BSD-3-Clause */
/* QEMU's NBD server and its exports of the devices' snapshot-access
 * nodes, which nbdkit's plugin reads.
 */
#ifndef BACKUPACCESS_HELPER_EXPORTS_H
#define BACKUPACCESS_HELPER_EXPORTS_H

#include "state.h"

/* QEMU's NBD server on DIR/qemu-nbd.sock, and a writable export of each
 * device's node (with its bitmap), named after the device; each step
 * recorded first.
 */
void start_exports (struct helper_state *st);

/* Removes the exports and stops the NBD server that st records, each
 * step recorded as it is done; QEMU's refusals are warnings.
 */
void stop_exports (struct helper_state *st);

#endif /* BACKUPACCESS_HELPER_EXPORTS_H */
