/* SPDX-License-Identifier: BSD-3-Clause */
/* QEMU's NBD server and its exports of the devices. */
#ifndef BACKUPACCESS_HELPER_EXPORTS_H
#define BACKUPACCESS_HELPER_EXPORTS_H

#include "state.h"

/* QEMU's NBD server on DIR/qemu-nbd.sock, and a writable export of each
 * device's node (with its bitmap), named after the device; each step
 * recorded first.
 */
void start_exports (struct helper_state *st);

#endif /* BACKUPACCESS_HELPER_EXPORTS_H */
