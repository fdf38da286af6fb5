/* SPDX-License-Identifier: BSD-3-Clause */
/* The run directory: where it is (resolved once, every directory above
 * it safe from other users), its creation, private to the caller, and
 * the sockets left in it.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <json.h>

#include "rundir.h"
#include "util.h"

char *run_dir;

/* A directory only root and the caller can change the entries of:
 * owned by one of them, and not writable by others unless sticky (then
 * only an entry's owner may rename or remove it).
 */
static bool
dir_is_safe (const struct stat *st)
{
  return S_ISDIR (st->st_mode) &&
    (st->st_uid == 0 || st->st_uid == geteuid ()) &&
    ((st->st_mode & 022) == 0 || (st->st_mode & S_ISVTX) != 0);
}

/* The real path of a directory (or of one to be made, in an existing
 * parent), used from then on: every directory above it must be safe,
 * so that nobody else can swap a component of it for a symlink (to
 * make us write or serve elsewhere) once it has been checked.  With
 * check_self the directory itself must be safe too.
 */
char *
checked_dir_path (const char *what, const char *path, bool check_self)
{
  char *r = realpath (path, NULL);
  struct stat st;

  if (r == NULL) {
    char *copy, *slash, *parent;
    if (errno != ENOENT)
      die ("%s %s: %m", what, path);
    copy = strdup (path);
    if (copy == NULL)
      die ("out of memory");
    for (size_t n = strlen (copy); n > 1 && copy[n - 1] == '/'; n--)
      copy[n - 1] = '\0';
    slash = strrchr (copy, '/');
    if (slash == NULL || slash[1] == '\0')
      die ("%s %s: not a directory name", what, path);
    *slash = '\0';
    parent = realpath (slash == copy ? "/" : copy, NULL);
    if (parent == NULL)
      die ("%s %s: %m", what, copy);
    r = xasprintf ("%s/%s", strcmp (parent, "/") == 0 ? "" : parent,
                   slash + 1);
    free (parent);
    free (copy);
    check_self = false;         /* it does not exist yet */
  }
  /* Every ancestor: "/", "/a", "/a/b", ... */
  for (char *p = r; p; p = strchr (p + 1, '/')) {
    char *prefix = p == r ? strdup ("/") : strndup (r, p - r);
    if (prefix == NULL)
      die ("out of memory");
    if (lstat (prefix, &st) == -1)
      die ("%s %s: %s: %m", what, path, prefix);
    if (!dir_is_safe (&st))
      die ("%s %s: %s can be changed by another user (it must be owned "
           "by root or you, and not writable by others unless sticky)",
           what, path, prefix);
    free (prefix);
  }
  if (check_self && (lstat (r, &st) == -1 || !dir_is_safe (&st)))
    die ("%s %s: must be a directory of root's or yours, not writable by "
         "others unless sticky", what, path);
  return r;
}

/* A run directory of the caller's, private to it. */
static bool
is_private (const struct stat *st)
{
  return S_ISDIR (st->st_mode) && st->st_uid == geteuid () &&
    (st->st_mode & 077) == 0;
}

#define NOT_PRIVATE "must be a directory owned by you with mode 0700"

/* Creates the run directory, private to the caller, or checks that an
 * existing one is.
 */
void
make_run_dir (void)
{
  struct stat st;

  if (mkdir (run_dir, 0700) == -1 && errno != EEXIST)
    die ("mkdir %s: %m", run_dir);
  if (lstat (run_dir, &st) == -1)
    die ("%s: %m", run_dir);
  if (!is_private (&st))
    die ("%s: " NOT_PRIVATE, run_dir);
}

bool
run_dir_exists (void)
{
  struct stat st;

  if (lstat (run_dir, &st) == -1) {
    if (errno == ENOENT)
      return false;
    die ("%s: %m", run_dir);
  }
  if (!is_private (&st))
    die ("%s: " NOT_PRIVATE, run_dir);
  return true;
}

/* The open run directory whose lock we hold, or -1; and the one whose
 * lock release_run_dir gave up, kept open to take it back, or -1.
 */
static int lock_fd = -1;
static int released_fd = -1;

/* Whether fd is still the directory at run_dir (not one removed by a
 * teardown while we waited for its lock).
 */
static bool
still_there (int fd)
{
  struct stat a, b;

  return fstat (fd, &a) == 0 && lstat (run_dir, &b) == 0 &&
    a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* Takes the lock of the open directory fd, waiting (with a word) while
 * another helper holds it; whether fd is the run directory then.
 */
static bool
take_lock (int fd)
{
  if (flock (fd, LOCK_EX | LOCK_NB) == -1) {
    warn ("%s is in use by another backupaccess-helper: waiting for it",
          run_dir);
    if (flock (fd, LOCK_EX) == -1)
      die ("flock %s: %m", run_dir);
  }
  if (still_there (fd)) {
    lock_fd = fd;
    return true;
  }
  close (fd);
  return false;
}

void
lock_run_dir (void)
{
  while (lock_fd == -1) {
    int fd;
    make_run_dir ();
    fd = open (run_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd == -1)
      die ("%s: %m", run_dir);
    take_lock (fd);
  }
}

bool
lock_existing_run_dir (void)
{
  int fd = released_fd;
  struct stat st;

  if (lock_fd != -1)
    return true;
  released_fd = -1;
  if (fd == -1) {
    fd = open (run_dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd == -1 && errno == ENOENT)
      return false;
    if (fd == -1)
      die ("%s: %m", run_dir);
    if (fstat (fd, &st) == -1 || !is_private (&st))
      die ("%s: " NOT_PRIVATE, run_dir);
  }
  return take_lock (fd);
}

void
release_run_dir (void)
{
  if (lock_fd != -1 && flock (lock_fd, LOCK_UN) == -1)
    die ("flock %s: %m", run_dir);
  released_fd = lock_fd;
  lock_fd = -1;
}

void
unlock_run_dir (void)
{
  if (lock_fd != -1) {
    close (lock_fd);
    lock_fd = -1;
  }
}

/* Sockets left in the run directory by processes stop_strays ended
 * (they do not remove them): nothing else listens there.
 */
void
remove_stray_sockets (void)
{
  DIR *dir = opendir (run_dir);
  struct dirent *e;
  struct stat st;

  while (dir && (e = readdir (dir)) != NULL) {
    char *p = xasprintf ("%s/%s", run_dir, e->d_name);
    if (lstat (p, &st) == 0 && S_ISSOCK (st.st_mode))
      unlink (p);
    free (p);
  }
  if (dir)
    closedir (dir);
}
