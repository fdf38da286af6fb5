/* SPDX-License-Identifier: BSD-3-Clause */
/* The FUSE low-level operations of backupaccess-mount (fs.h): a fixed
 * tree of three inodes (the directory, the disk, its .dirty file), the
 * disk opened with direct I/O so that the kernel neither caches nor
 * reads ahead into areas the backup may not read, and every read
 * answered from a buffer of the worker thread's own (no allocation and
 * no page faults per request).  A read consumes its data only once the
 * reply has reached the kernel.
 */
#define _GNU_SOURCE             /* FALLOC_FL_*, SEEK_DATA */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fs.h"
#include "log.h"

enum { ROOT_INO = FUSE_ROOT_ID, DISK_INO, DIRTY_INO };

/* Names and attributes never change. */
#define TIMEOUT 86400.0

struct fs {
  struct disk *disk;
  char *name, *dirty_name;
  char *dirty_text;             /* NAME.dirty's contents */
  size_t dirty_len;
  time_t started;
  pthread_key_t buffer_key;     /* each worker thread's read buffer */
};

struct buffer {
  size_t size;
  char data[];
};

/* "OFFSET LENGTH" lines, as nbdinfo --map prints them (without the
 * type): a map file for the filter's backupaccess-map too.
 */
static char *
dirty_text (const struct ba_regions *dirty, size_t *len)
{
  char *text = NULL;
  FILE *fp = open_memstream (&text, len);

  if (fp == NULL)
    return NULL;
  for (size_t i = 0; i < dirty->n; i++)
    fprintf (fp, "%" PRIu64 " %" PRIu64 "\n", dirty->r[i].start,
             dirty->r[i].end - dirty->r[i].start);
  if (fclose (fp) != 0) {
    free (text);
    return NULL;
  }
  return text;
}

struct fs *
fs_new (struct disk *d, const char *name)
{
  struct fs *fs = calloc (1, sizeof *fs);

  if (fs == NULL)
    return NULL;
  fs->disk = d;
  fs->started = time (NULL);
  fs->name = strdup (name);
  if (fs->name == NULL || asprintf (&fs->dirty_name, "%s.dirty", name) == -1 ||
      (fs->dirty_text = dirty_text (disk_dirty (d), &fs->dirty_len)) == NULL ||
      pthread_key_create (&fs->buffer_key, free) != 0) {
    free (fs->dirty_text);
    free (fs->dirty_name);
    free (fs->name);
    free (fs);
    return NULL;
  }
  return fs;
}

void
fs_free (struct fs *fs)
{
  if (fs == NULL)
    return;
  pthread_key_delete (fs->buffer_key);
  free (fs->dirty_text);
  free (fs->dirty_name);
  free (fs->name);
  free (fs);
}

/* This thread's read buffer of at least size bytes, or NULL. */
static void *
thread_buffer (struct fs *fs, size_t size)
{
  struct buffer *b = pthread_getspecific (fs->buffer_key);

  if (b == NULL || b->size < size) {
    free (b);
    pthread_setspecific (fs->buffer_key, NULL);
    if (posix_memalign ((void **) &b, 4096, sizeof *b + size) != 0)
      return NULL;
    b->size = size;
    pthread_setspecific (fs->buffer_key, b);
  }
  return b->data;
}

static int
fill_stat (const struct fs *fs, fuse_ino_t ino, struct stat *st)
{
  memset (st, 0, sizeof *st);
  st->st_ino = ino;
  st->st_uid = getuid ();
  st->st_gid = getgid ();
  st->st_atime = st->st_mtime = st->st_ctime = fs->started;
  st->st_blksize = 65536;
  switch (ino) {
  case ROOT_INO:
    st->st_mode = S_IFDIR | 0700;
    st->st_nlink = 2;
    return 0;
  case DISK_INO:
    st->st_mode = S_IFREG | (disk_readonly (fs->disk) ? 0400 : 0600);
    st->st_size = (off_t) disk_size (fs->disk);
    break;
  case DIRTY_INO:
    st->st_mode = S_IFREG | 0400;
    st->st_size = (off_t) fs->dirty_len;
    break;
  default:
    return ENOENT;
  }
  st->st_nlink = 1;
  st->st_blocks = (st->st_size + 511) / 512;
  return 0;
}

static void
fs_lookup (fuse_req_t req, fuse_ino_t parent, const char *name)
{
  struct fs *fs = fuse_req_userdata (req);
  struct fuse_entry_param e = { .attr_timeout = TIMEOUT,
                                .entry_timeout = TIMEOUT };

  if (parent != ROOT_INO)
    e.ino = 0;
  else if (strcmp (name, fs->name) == 0)
    e.ino = DISK_INO;
  else if (strcmp (name, fs->dirty_name) == 0)
    e.ino = DIRTY_INO;
  if (e.ino == 0) {
    fuse_reply_err (req, ENOENT);
    return;
  }
  fill_stat (fs, e.ino, &e.attr);
  fuse_reply_entry (req, &e);
}

static void
fs_getattr (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  struct stat st;
  int e = fill_stat (fuse_req_userdata (req), ino, &st);

  if (e)
    fuse_reply_err (req, e);
  else
    fuse_reply_attr (req, &st, TIMEOUT);
}

/* Nothing about the files may change: not their size, not their mode. */
static void
fs_setattr (fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
            struct fuse_file_info *fi)
{
  fuse_reply_err (req, EPERM);
}

static void
fs_readdir (fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
            struct fuse_file_info *fi)
{
  struct fs *fs = fuse_req_userdata (req);
  const char *names[] = { ".", "..", fs->name, fs->dirty_name };
  const fuse_ino_t inos[] = { ROOT_INO, ROOT_INO, DISK_INO, DIRTY_INO };
  char buf[4096];
  size_t used = 0, room = size < sizeof buf ? size : sizeof buf;

  if (ino != ROOT_INO) {
    fuse_reply_err (req, ENOTDIR);
    return;
  }
  for (off_t i = off; i >= 0 && i < 4; i++) {
    struct stat st = { .st_ino = inos[i],
                       .st_mode = i < 2 ? S_IFDIR : S_IFREG };
    size_t n = fuse_add_direntry (req, buf + used, room - used, names[i],
                                  &st, i + 1);
    if (n > room - used)
      break;
    used += n;
  }
  fuse_reply_buf (req, buf, used);
}

static void
fs_open (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
  struct fs *fs = fuse_req_userdata (req);
  bool writing = (fi->flags & O_ACCMODE) != O_RDONLY;

  if (ino == DIRTY_INO) {
    if (writing) {
      fuse_reply_err (req, EACCES);
      return;
    }
    fi->keep_cache = 1;
  }
  else if (ino == DISK_INO) {
    /* Opened for writing so that the reader can punch holes. */
    if (writing && disk_readonly (fs->disk)) {
      fuse_reply_err (req, EROFS);
      return;
    }
    fi->direct_io = 1;
  }
  else {
    fuse_reply_err (req, EISDIR);
    return;
  }
  fuse_reply_open (req, fi);
}

static void
read_dirty (fuse_req_t req, struct fs *fs, size_t size, off_t off)
{
  if ((uint64_t) off >= fs->dirty_len)
    size = 0;
  else if (size > fs->dirty_len - (size_t) off)
    size = fs->dirty_len - (size_t) off;
  fuse_reply_buf (req, size ? fs->dirty_text + off : NULL, size);
}

static void
fs_read (fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
         struct fuse_file_info *fi)
{
  struct fs *fs = fuse_req_userdata (req);
  uint64_t disk_end = disk_size (fs->disk);
  void *buf;
  int e;

  if (ino == DIRTY_INO) {
    read_dirty (req, fs, size, off);
    return;
  }
  if ((uint64_t) off >= disk_end) {
    fuse_reply_buf (req, NULL, 0);
    return;
  }
  if (size > disk_end - (uint64_t) off)
    size = disk_end - (uint64_t) off;
  buf = thread_buffer (fs, size);
  if (buf == NULL) {
    fuse_reply_err (req, ENOMEM);
    return;
  }
  e = disk_read (fs->disk, buf, size, (uint64_t) off);
  if (e) {
    fuse_reply_err (req, e);
    return;
  }
  /* Interrupted, or the reader is gone: the data did not reach it. */
  e = fuse_reply_buf (req, buf, size);
  if (e == 0)
    disk_read_done (fs->disk, (uint64_t) off, size);
  else
    log_info ("read [%" PRIu64 ", +%zu]: the reply did not reach the "
              "reader (%s): not counted as read", (uint64_t) off, size,
              strerror (-e));
}

static void
fs_write (fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
          off_t off, struct fuse_file_info *fi)
{
  log_error ("write [%" PRIi64 ", +%zu) refused: a backup view is "
             "read-only", (int64_t) off, size);
  fuse_reply_err (req, EPERM);
}

/* fallocate(PUNCH_HOLE | KEEP_SIZE), as Proxmox VE's deallocate() does
 * it: the range is backed up, and counts as read.
 */
static void
fs_fallocate (fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
              off_t length, struct fuse_file_info *fi)
{
  struct fs *fs = fuse_req_userdata (req);
  uint64_t end = disk_size (fs->disk);

  if (ino != DISK_INO ||
      mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)) {
    fuse_reply_err (req, EOPNOTSUPP);
    return;
  }
  if (offset < 0 || length <= 0 || (uint64_t) offset >= end) {
    fuse_reply_err (req, offset < 0 || length <= 0 ? EINVAL : 0);
    return;
  }
  if ((uint64_t) length > end - (uint64_t) offset)
    length = (off_t) (end - (uint64_t) offset);
  fuse_reply_err (req, disk_punch (fs->disk, (uint64_t) offset,
                                   (uint64_t) length));
}

static void
fs_lseek (fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
          struct fuse_file_info *fi)
{
  struct fs *fs = fuse_req_userdata (req);
  int64_t r;

  if ((whence != SEEK_DATA && whence != SEEK_HOLE) || off < 0 ||
      (ino != DISK_INO && ino != DIRTY_INO)) {
    fuse_reply_err (req, EINVAL);
    return;
  }
  if (ino == DISK_INO)
    r = disk_seek (fs->disk, (uint64_t) off, whence == SEEK_DATA);
  else if ((uint64_t) off >= fs->dirty_len)
    r = -ENXIO;
  else
    r = whence == SEEK_DATA ? off : (int64_t) fs->dirty_len;
  if (r < 0)
    fuse_reply_err (req, (int) -r);
  else
    fuse_reply_lseek (req, r);
}

static void
fs_init (void *userdata, struct fuse_conn_info *conn)
{
  /* Direct I/O reads no ahead; the .dirty file needs none either. */
  conn->max_readahead = 0;
  log_debug ("FUSE: max_read %u, max_write %u, max_background %u, "
             "capabilities 0x%x", conn->max_read, conn->max_write,
             conn->max_background, conn->want);
}

const struct fuse_lowlevel_ops fs_operations = {
  .init = fs_init,
  .lookup = fs_lookup,
  .getattr = fs_getattr,
  .setattr = fs_setattr,
  .readdir = fs_readdir,
  .open = fs_open,
  .read = fs_read,
  .write = fs_write,
  .fallocate = fs_fallocate,
  .lseek = fs_lseek,
};
