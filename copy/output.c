/* SPDX-License-Identifier: BSD-3-Clause */
/* The backup image backupaccess-copy writes: checked before anything is
 * made, written as OUTPUT.part (a qcow2 image through qemu-nbd started
 * with libnbd's socket activation, as nbdcopy's [ qemu-nbd ... ] does,
 * or a sparse raw file), and renamed to OUTPUT only once it is complete
 * and flushed.  A copy that fails removes OUTPUT.part: nothing half
 * written ever carries the name of a backup.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <json.h>
#include <libnbd.h>

#include "program.h"

struct output {
  char *path, *part, *dir;
  bool qcow2;
  const char *backing, *backing_format;
  uint64_t size;
  int fd;                       /* OUTPUT.part, locked; raw: written */
  struct nbd_handle **h;        /* qcow2: the connections to qemu-nbd */
  unsigned n;
};

/* The format a file name says: qcow2, raw, or NULL. */
static const char *
format_of_name (const char *path)
{
  size_t n = strlen (path);

  if (n > 6 && strcmp (path + n - 6, ".qcow2") == 0)
    return "qcow2";
  if (n > 4 && strcmp (path + n - 4, ".raw") == 0)
    return "raw";
  return NULL;
}

/* Reads everything from fd into buf (NUL-terminated, truncated). */
static void
slurp (int fd, char *buf, size_t len)
{
  size_t got = 0;
  ssize_t r;

  while ((r = read (fd, buf + got, len - 1 - got)) > 0 ||
         (r == -1 && errno == EINTR))
    if (r > 0 && (got += r) == len - 1)
      break;
  buf[got] = '\0';
  while (read (fd, &(char) { 0 }, 1) > 0)
    ;                           /* the rest, so that the child ends */
}

/* Runs argv (no shell) with its output into out (stdout and stderr);
 * returns its exit status, or -1.
 */
static int
run_program (char *const *argv, char *out, size_t len)
{
  int p[2], status;
  pid_t pid;

  if (pipe2 (p, O_CLOEXEC) == -1)
    return -1;
  pid = fork ();
  if (pid == -1) {
    close (p[0]);
    close (p[1]);
    return -1;
  }
  if (pid == 0) {
    dup2 (p[1], 1);
    dup2 (p[1], 2);
    execvp (argv[0], argv);
    fprintf (stderr, "cannot run %s: %m\n", argv[0]);
    _exit (127);
  }
  close (p[1]);
  slurp (p[0], out, len);
  close (p[0]);
  while (waitpid (pid, &status, 0) == -1)
    if (errno != EINTR)
      return -1;
  return WIFEXITED (status) ? WEXITSTATUS (status) : 128 + WTERMSIG (status);
}

/* PREV's virtual size, opening it as fmt (qemu-img checks the format). */
static int
backing_size (const struct output *out, const char *fmt, uint64_t *size,
              char *err, size_t len)
{
  char *path = out->backing[0] == '/' ? strdup (out->backing)
    : NULL, buf[8192];
  json_object *j, *v;
  int r = -1;

  if (path == NULL &&
      asprintf (&path, "%s/%s", out->dir, out->backing) == -1)
    path = NULL;
  if (path == NULL) {
    snprintf (err, len, "out of memory");
    return -1;
  }
  {
    char *argv[] = { "qemu-img", "info", "--output=json", "-f",
                     (char *) fmt, path, NULL };
    if (run_program (argv, buf, sizeof buf) != 0) {
      buf[strcspn (buf, "\n")] = '\0';
      snprintf (err, len, "--backing %s: not a %s image: %s", out->backing,
                fmt, buf);
      goto out;
    }
  }
  j = json_tokener_parse (buf);
  if (j && json_object_object_get_ex (j, "virtual-size", &v)) {
    *size = (uint64_t) json_object_get_int64 (v);
    r = 0;
  }
  else
    snprintf (err, len, "--backing %s: qemu-img info gave no size",
              out->backing);
  json_object_put (j);
 out:
  free (path);
  return r;
}

/* The backing file: its format and size.  A raw PREV is never probed:
 * its first bytes are the guest's, who could make it look like a qcow2
 * image naming any file as its backing file.
 */
static int
check_backing (struct output *out, const struct options *o,
               uint64_t disk_size, bool incremental, char *err, size_t len)
{
  uint64_t size;

  if (!out->qcow2) {
    snprintf (err, len, "--backing needs a qcow2 OUTPUT (an overlay of "
              "PREV): %s is raw", out->path);
    return -1;
  }
  out->backing_format = o->backing_format ? o->backing_format
    : format_of_name (o->backing);
  if (out->backing_format == NULL) {
    snprintf (err, len, "--backing %s: give its format with "
              "--backing-format raw|qcow2 (the name does not end in .raw "
              "or .qcow2)", o->backing);
    return -1;
  }
  if (backing_size (out, out->backing_format, &size, err, len) == -1)
    return -1;
  if (incremental && size != disk_size) {
    snprintf (err, len, "--backing %s: %" PRIu64 " bytes, but the disk "
              "has %" PRIu64 ": an incremental backup builds on a previous "
              "backup of the same disk", o->backing, size, disk_size);
    return -1;
  }
  return 0;
}

struct output *
output_check (const struct options *o, uint64_t disk_size, bool incremental,
              char *err, size_t len)
{
  struct output *out = calloc (1, sizeof *out);
  const char *fmt = o->format ? o->format : format_of_name (o->output);
  struct stat st;
  char *copy;

  if (out == NULL) {
    snprintf (err, len, "out of memory");
    return NULL;
  }
  out->fd = -1;
  out->size = disk_size;
  out->backing = o->backing;
  out->path = strdup (o->output);
  copy = strdup (o->output);
  out->dir = copy ? strdup (dirname (copy)) : NULL;
  free (copy);
  if (asprintf (&out->part, "%s.part", o->output) == -1)
    out->part = NULL;
  if (out->path == NULL || out->dir == NULL || out->part == NULL) {
    snprintf (err, len, "out of memory");
    goto fail;
  }
  if (fmt == NULL) {
    snprintf (err, len, "%s: give its format with --format qcow2|raw (the "
              "name does not end in .qcow2 or .raw)", o->output);
    goto fail;
  }
  out->qcow2 = strcmp (fmt, "qcow2") == 0;
  if (lstat (o->output, &st) == 0) {
    snprintf (err, len, "%s exists already: a backup is never written "
              "over a file", o->output);
    goto fail;
  }
  if (errno != ENOENT) {
    snprintf (err, len, "%s: %s", o->output, strerror (errno));
    goto fail;
  }
  if (stat (out->dir, &st) == -1 || !S_ISDIR (st.st_mode)) {
    snprintf (err, len, "%s: no such directory", out->dir);
    goto fail;
  }
  if (o->backing &&
      check_backing (out, o, disk_size, incremental, err, len) == -1)
    goto fail;
  return out;
 fail:
  output_free (out);
  return NULL;
}

bool
output_is_zero (const struct output *out)
{
  return out->backing == NULL;
}

/* OUTPUT.part, new and locked.  One left by a copy that was killed
 * (nobody holds its lock) is replaced.
 */
static int
make_part (struct output *out, char *err, size_t len)
{
  int fd = open (out->part, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);

  if (fd >= 0) {
    if (flock (fd, LOCK_EX | LOCK_NB) == -1) {
      snprintf (err, len, "%s: another copy is writing it", out->part);
      close (fd);
      return -1;
    }
    warn ("%s: removing what a copy that was stopped left", out->part);
    unlink (out->part);
    close (fd);
  }
  out->fd = open (out->part, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW |
                  O_CLOEXEC, 0600);
  if (out->fd == -1 || flock (out->fd, LOCK_EX | LOCK_NB) == -1) {
    snprintf (err, len, "%s: %s", out->part, strerror (errno));
    return -1;
  }
  return 0;
}

/* qemu-img create, then qemu-nbd on it for n connections. */
static int
open_qcow2 (struct output *out, unsigned n, char *err, size_t len)
{
  char size[32], shared[32], buf[4096];
  char *create[] = { "qemu-img", "create", "-q", "-f", "qcow2", out->part,
                     size, NULL, NULL, NULL, NULL, NULL };
  char *serve[] = { "qemu-nbd", "-f", "qcow2", shared, out->part, NULL };
  char *uri = NULL;

  snprintf (size, sizeof size, "%" PRIu64, out->size);
  snprintf (shared, sizeof shared, "--shared=%u", n);
  if (out->backing) {
    create[6] = "-b";
    create[7] = (char *) out->backing;
    create[8] = "-F";
    create[9] = (char *) out->backing_format;
    create[10] = size;
  }
  if (run_program (create, buf, sizeof buf) != 0) {
    snprintf (err, len, "qemu-img create %s: %s", out->part, buf);
    return -1;
  }
  out->h = calloc (n, sizeof (struct nbd_handle *));
  if (out->h == NULL) {
    snprintf (err, len, "out of memory");
    return -1;
  }
  for (; out->n < n; out->n++) {
    struct nbd_handle *h = nbd_create ();
    int r;

    if (h == NULL)
      break;
    out->h[out->n] = h;
    r = out->n == 0 ? nbd_connect_systemd_socket_activation (h, serve)
      : nbd_connect_uri (h, uri);
    if (r == -1 || (out->n == 0 && (uri = nbd_get_uri (h)) == NULL))
      break;
  }
  free (uri);
  if (out->n < n || nbd_get_size (out->h[0]) != (int64_t) out->size) {
    snprintf (err, len, "qemu-nbd %s: %s", out->part,
              out->n < n ? nbd_get_error () : "not the disk's size");
    return -1;
  }
  return 0;
}

int
output_open (struct output *out, unsigned n, char *err, size_t len)
{
  if (make_part (out, err, len) == -1)
    return -1;
  if (out->qcow2)
    return open_qcow2 (out, n, err, len);
  if (ftruncate (out->fd, (off_t) out->size) == -1) {
    snprintf (err, len, "%s: %s", out->part, strerror (errno));
    return -1;
  }
  return 0;
}

struct nbd_handle *
output_handle (struct output *out, unsigned i)
{
  return out->qcow2 ? out->h[i % out->n] : NULL;
}

int
output_write (struct output *out, const char *buf, uint64_t len,
              uint64_t offset, bool zeroes)
{
  uint64_t done = 0;
  ssize_t r;

  if (zeroes)
    return fallocate (out->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t) offset, (off_t) len);
  while (done < len) {
    r = pwrite (out->fd, buf + done, len - done, (off_t) (offset + done));
    if (r == -1 && errno == EINTR)
      continue;
    if (r <= 0) {
      if (r == 0)
        errno = EIO;
      return -1;
    }
    done += r;
  }
  return 0;
}

/* Closes the connections; the last one stops qemu-nbd. */
static void
close_handles (struct output *out, bool shutdown)
{
  while (out->n > 0) {
    struct nbd_handle *h = out->h[--out->n];
    if (shutdown)
      nbd_shutdown (h, 0);
    nbd_close (h);
  }
}

static int
flush_all (struct output *out, char *err, size_t len)
{
  if (!out->qcow2) {
    if (fsync (out->fd) == 0)
      return 0;
    snprintf (err, len, "%s: fsync: %s", out->part, strerror (errno));
    return -1;
  }
  /* Every connection: a flush covers the writes of its own. */
  for (unsigned i = 0; i < out->n; i++)
    if (nbd_flush (out->h[i], 0) == -1) {
      snprintf (err, len, "%s: flush: %s", out->part, nbd_get_error ());
      return -1;
    }
  return 0;
}

int
output_commit (struct output *out, char *err, size_t len)
{
  int dfd;

  if (flush_all (out, err, len) == -1)
    return -1;
  close_handles (out, true);
  /* link fails rather than replace a file that appeared meanwhile. */
  if (link (out->part, out->path) == -1) {
    snprintf (err, len, "%s: %s", out->path, strerror (errno));
    return -1;
  }
  unlink (out->part);
  dfd = open (out->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync (dfd);
    close (dfd);
  }
  close (out->fd);
  out->fd = -1;
  return 0;
}

void
output_abort (struct output *out)
{
  close_handles (out, false);
  if (out->fd >= 0) {
    unlink (out->part);
    close (out->fd);
    out->fd = -1;
  }
}

void
output_free (struct output *out)
{
  if (out == NULL)
    return;
  output_abort (out);
  free (out->h);
  free (out->path);
  free (out->part);
  free (out->dir);
  free (out);
}
