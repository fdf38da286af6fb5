/* SPDX-License-Identifier: BSD-3-Clause */
/* QEMU's NBD server and its exports of the devices. */
#ifndef BACKUPACCESS_HELPER_EXPORTS_H
#define BACKUPACCESS_HELPER_EXPORTS_H

void start_exports (void);

#endif /* BACKUPACCESS_HELPER_EXPORTS_H */
