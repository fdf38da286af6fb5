/* SPDX-License-Identifier: BSD-3-Clause */
/* The file system backupaccess-mount serves: one directory with the
 * disk as a file NAME, read with direct I/O, and NAME.dirty, its dirty
 * regions as "OFFSET LENGTH" lines.  FUSE low-level operations over
 * struct disk (disk.h).
 */
#ifndef BACKUPACCESS_MOUNT_FS_H
#define BACKUPACCESS_MOUNT_FS_H

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include "disk.h"

struct fs;

/* The file system of disk d, its file called name.  Returns it, or NULL
 * (out of memory).
 */
struct fs *fs_new (struct disk *d, const char *name);
void fs_free (struct fs *fs);

/* The operations, whose userdata is a struct fs. */
extern const struct fuse_lowlevel_ops fs_operations;

#endif /* BACKUPACCESS_MOUNT_FS_H */
