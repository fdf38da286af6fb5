/* SPDX-License-Identifier: BSD-3-Clause */
/* The copy-before-write cluster's rules (cluster.h). */
#include "cluster.h"

bool
ba_cluster_size_valid (int64_t size)
{
  return size >= BA_CLUSTER_MIN && size <= BA_CLUSTER_MAX &&
    (size & (size - 1)) == 0;
}

int64_t
ba_cbw_cluster (int64_t fleecing_cluster)
{
  return fleecing_cluster > BA_CLUSTER_DEFAULT
    ? fleecing_cluster : BA_CLUSTER_DEFAULT;
}
