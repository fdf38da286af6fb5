/* SPDX-License-Identifier: BSD-3-Clause */
/* The copy-before-write cluster: the unit of every discard sent to QEMU
 * (QEMU 7.0 to 9.0 abort on any other), and its limits, written once for
 * the filter, the plugin and the helper.
 */
#ifndef BACKUPACCESS_CLUSTER_H
#define BACKUPACCESS_CLUSTER_H

#include <stdbool.h>
#include <stdint.h>

/* QEMU's copy-before-write cluster is never below 64 KiB. */
#define BA_CLUSTER_DEFAULT ((int64_t) 64 << 10)
/* What the filter and the plugin accept (smaller ones are for tests
 * over nbdkit's own plugins).
 */
#define BA_CLUSTER_MIN ((int64_t) 512)
#define BA_CLUSTER_MAX ((int64_t) 1 << 30)
/* qcow2's limits, for the fleecing images the helper creates. */
#define BA_QCOW2_CLUSTER_MIN ((int64_t) 512)
#define BA_QCOW2_CLUSTER_MAX ((int64_t) 2 << 20)

/* What nbdkit lets a server advertise as its preferred block size (a
 * power of two).
 */
#define BA_PREFERRED_MIN ((int64_t) 512)
#define BA_PREFERRED_MAX ((int64_t) 32 << 20)

#define BA_CLUSTER_RULE "a power of two between 512 and 1G"

/* A power of two between BA_CLUSTER_MIN and BA_CLUSTER_MAX. */
bool ba_cluster_size_valid (int64_t size);

/* The copy-before-write cluster that QEMU uses over a fleecing image
 * whose own cluster is fleecing_cluster (0 or less: unknown): the
 * larger of the two and 64 KiB.
 */
int64_t ba_cbw_cluster (int64_t fleecing_cluster);

#endif /* BACKUPACCESS_CLUSTER_H */
