/* backupaccess-helper: sets up snapshot access to a running QEMU's disks
 * over QMP, serves it through nbdkit + the backupaccess filter, mounts
 * it with nbdfuse, reports progress, and tears it all down again.
 *
 * Every step is recorded in DIR/state.json before (or as) it is taken,
 * so that "teardown" can undo a setup that stopped half-way, and can run
 * twice.  No shell is ever used: child processes get an argv.
 *
 * The QMP sequences are setup_upstream, setup_proxmox and
 * teardown_qemu below.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <dirent.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <json.h>
#include <libnbd.h>

#include "bitmap.h"
#include "cluster.h"
#include "regions.h"
#include "qmp.h"
#include "statefile.h"

#define QMP_TIMEOUT_MS 60000
#define WAIT_SECONDS 20

static const char *progname = "backupaccess-helper";
/* The caller's umask, given back to COMMAND in run. */
static mode_t caller_umask;

/* ------------------------------------------------------------------ */
/* Errors and small utilities */

static void
vmessage (const char *fmt, va_list ap)
{
  fprintf (stderr, "%s: ", progname);
  vfprintf (stderr, fmt, ap);
  fputc ('\n', stderr);
}

static void __attribute__ ((format (printf, 1, 2)))
warn (const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  vmessage (fmt, ap);
  va_end (ap);
}

/* Set while setup or run builds something: an error then undoes what
 * was built (teardown --failure) before exiting.
 */
static bool roll_back_on_error;
static void roll_back (void);

static void __attribute__ ((format (printf, 1, 2), noreturn))
die (const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  vmessage (fmt, ap);
  va_end (ap);
  if (roll_back_on_error) {
    roll_back_on_error = false;         /* once: die may come back here */
    roll_back ();
  }
  exit (1);
}

static char * __attribute__ ((format (printf, 1, 2)))
xasprintf (const char *fmt, ...)
{
  va_list ap;
  char *s;
  va_start (ap, fmt);
  if (vasprintf (&s, fmt, ap) == -1)
    die ("out of memory");
  va_end (ap);
  return s;
}

static void
sleep_ms (long ms)
{
  struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
  nanosleep (&ts, NULL);
}

/* Names go into QMP commands and file names: keep them plain. */
static void
check_name (const char *what, const char *s, bool colon_ok)
{
  size_t n = strlen (s);

  if (n == 0 || n > 128)
    die ("%s '%s': must be 1 to 128 characters", what, s);
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '-' || c == '_' ||
          (c == '.' && i > 0) || (c == ':' && colon_ok)))
      die ("%s '%s': only letters, digits, '-', '_', '.'%s are allowed",
           what, s, colon_ok ? " and ':'" : "");
  }
}

/* ------------------------------------------------------------------ */
/* The state file */

static char *run_dir;
static json_object *state;

static char *
state_path (void)
{
  return xasprintf ("%s/state.json", run_dir);
}

static void
save_state (void)
{
  char *path = state_path ();
  char *tmp = xasprintf ("%s.tmp", path);
  int fd = open (tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC,
                 0600);
  const char *text = json_object_to_json_string_ext (state,
                                                     JSON_C_TO_STRING_PRETTY);

  if (fd == -1 || write (fd, text, strlen (text)) != (ssize_t) strlen (text)
      || write (fd, "\n", 1) != 1 || fsync (fd) == -1 || close (fd) == -1 ||
      rename (tmp, path) == -1)
    die ("writing %s: %m", path);
  free (tmp);
  free (path);
}

/* Loads DIR/state.json; returns false if there is none. */
static bool
load_state (void)
{
  char *path = state_path ();
  char err[PATH_MAX * 2 + 512];
  int r;

  json_object_put (state);      /* teardown after setup: read it again */
  state = NULL;
  r = ba_state_load (path, &state, err, sizeof err);

  if (r == -1)
    die ("%s", err);
  free (path);
  return r == 1;
}

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
static char *
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

/* Creates the run directory, private to the caller, or checks that an
 * existing one is.
 */
static void
make_run_dir (void)
{
  struct stat st;

  if (mkdir (run_dir, 0700) == -1 && errno != EEXIST)
    die ("mkdir %s: %m", run_dir);
  if (lstat (run_dir, &st) == -1)
    die ("%s: %m", run_dir);
  if (!S_ISDIR (st.st_mode) || st.st_uid != geteuid () ||
      (st.st_mode & 077) != 0)
    die ("%s: must be a directory owned by you with mode 0700", run_dir);
}

static const char *
get_str (json_object *o, const char *key)
{
  json_object *v;
  if (o && json_object_object_get_ex (o, key, &v) &&
      json_object_is_type (v, json_type_string))
    return json_object_get_string (v);
  return NULL;
}

static int64_t
get_int (json_object *o, const char *key, int64_t def)
{
  json_object *v;
  if (o && json_object_object_get_ex (o, key, &v) &&
      (json_object_is_type (v, json_type_int)))
    return json_object_get_int64 (v);
  return def;
}

static bool
get_bool (json_object *o, const char *key)
{
  json_object *v;
  return o && json_object_object_get_ex (o, key, &v) &&
    json_object_get_boolean (v);
}

static void
set_str (json_object *o, const char *key, const char *value)
{
  json_object_object_add (o, key, value ? json_object_new_string (value)
                          : NULL);
}

/* The length of a list QEMU (or the state file) gave us: 0 for
 * anything that is not a list (json-c aborts on those).
 */
static size_t
alen (json_object *a)
{
  return json_object_is_type (a, json_type_array)
    ? json_object_array_length (a) : 0;
}

static json_object *
devices (void)
{
  json_object *d;
  if (!json_object_object_get_ex (state, "devices", &d)) {
    d = json_object_new_array ();
    json_object_object_add (state, "devices", d);
  }
  else {
    bool ok = json_object_is_type (d, json_type_array);
    for (size_t i = 0; ok && i < alen (d); i++) {
      json_object *e = json_object_array_get_idx (d, i);
      ok = json_object_is_type (e, json_type_object);
      /* Device names are joined into paths in the run directory. */
      if (ok && get_str (e, "device"))
        check_name ("device in the state file", get_str (e, "device"), false);
    }
    if (!ok)
      die ("%s/state.json: \"devices\" is not a list of objects", run_dir);
  }
  return d;
}

/* ------------------------------------------------------------------ */
/* QMP */

static struct ba_qmp *qmp;

/* How long QEMU may take to answer a command: 60 s, or
 * BACKUPACCESS_QMP_TIMEOUT seconds.
 */
static int
qmp_timeout_ms (void)
{
  const char *s = getenv ("BACKUPACCESS_QMP_TIMEOUT");
  char *end;
  long v;

  if (s == NULL || *s == '\0')
    return QMP_TIMEOUT_MS;
  errno = 0;
  v = strtol (s, &end, 10);
  if (errno || *end || v < 1 || v > 3600)
    die ("BACKUPACCESS_QMP_TIMEOUT=%s: expected seconds, 1 to 3600", s);
  return (int) v * 1000;
}

static void
qmp_open (const char *path)
{
  char err[1024];
  qmp = ba_qmp_connect (path, qmp_timeout_ms (), err, sizeof err);
  if (qmp == NULL)
    die ("%s", err);
}

/* Runs a QMP command; dies on error unless ok_errors, in which case
 * it returns NULL.  args is consumed.
 */
static json_object *
qmp_run (bool ok_errors, const char *cmd, json_object *args)
{
  char err[1024];
  int qemu_error;
  json_object *r = ba_qmp_cmd (qmp, cmd, args, &qemu_error, err, sizeof err);

  json_object_put (args);
  if (r == NULL) {
    if (!ok_errors || !qemu_error)
      die ("QMP %s: %s", cmd, err);
    warn ("QMP %s: %s (ignored)", cmd, err);
  }
  return r;
}

/* Runs a QMP command that returns a list; anything else is an error. */
static json_object *
qmp_list (const char *cmd, json_object *args)
{
  json_object *r = qmp_run (false, cmd, args);

  if (!json_object_is_type (r, json_type_array))
    die ("QMP %s: QEMU's answer is not a list", cmd);
  return r;
}

/* Builds a JSON object from "key", json_object* pairs, ended by END (a
 * typed null: a bare NULL in a variadic list need not be a pointer).
 */
#define END ((const char *) NULL)

static json_object *
obj (const char *key, ...)
{
  json_object *o = json_object_new_object ();
  va_list ap;

  va_start (ap, key);
  while (key) {
    json_object_object_add (o, key, va_arg (ap, json_object *));
    key = va_arg (ap, const char *);
  }
  va_end (ap);
  return o;
}

#define S(x) json_object_new_string (x)

/* The block node with this node name, from query-named-block-nodes. */
static json_object *
find_node (json_object *nodes, const char *name)
{
  for (size_t i = 0; i < alen (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i);
    const char *nn = get_str (n, "node-name");
    if (nn && strcmp (nn, name) == 0)
      return n;
  }
  return NULL;
}

/* Whether a node (from query-named-block-nodes) has this bitmap. */
static bool
node_has_bitmap (json_object *nodes, const char *node, const char *bitmap)
{
  json_object *n = find_node (nodes, node), *bm;

  if (n && json_object_object_get_ex (n, "dirty-bitmaps", &bm))
    for (size_t j = 0; j < json_object_array_length (bm); j++)
      if (strcmp (get_str (json_object_array_get_idx (bm, j), "name") ?: "",
                  bitmap) == 0)
        return true;
  return false;
}

static json_object *
named_nodes (void)
{
  return qmp_list ("query-named-block-nodes",
                   obj ("flat", json_object_new_boolean (1), END));
}

static int64_t
node_image_int (json_object *node, const char *key)
{
  json_object *image;
  if (node && json_object_object_get_ex (node, "image", &image))
    return get_int (image, key, -1);
  return -1;
}

/* Waits until the list a query returns has no entry whose key is
 * value: an export (query-block-exports, "id") or a block job
 * (query-block-jobs, "device") that is going away.
 */
static void
wait_gone (const char *query, const char *key, const char *value)
{
  for (int i = 0; i < WAIT_SECONDS * 10; i++) {
    json_object *list = qmp_list (query, NULL);
    bool found = false;
    for (size_t j = 0; j < alen (list); j++)
      if (strcmp (get_str (json_object_array_get_idx (list, j), key) ?: "",
                  value) == 0)
        found = true;
    json_object_put (list);
    if (!found)
      return;
    sleep_ms (100);
  }
  die ("%s still lists %s after %d s", query, value, WAIT_SECONDS);
}

/* ------------------------------------------------------------------ */
/* Child processes: argv only, never a shell. */

static pid_t
spawn (char **argv, const char *log, bool background)
{
  pid_t parent = getpid ();
  pid_t pid = fork ();

  if (pid == -1)
    die ("fork: %m");
  if (pid == 0) {
    int fd, null;
    if (!background) {
      /* A helper killed half-way takes qemu-img with it: teardown must
       * not race with it over the fleecing file.  First thing, before
       * any file is touched; and if the helper was killed even before
       * that, nobody else would stop us.
       */
      prctl (PR_SET_PDEATHSIG, SIGKILL);
      if (getppid () != parent)
        _exit (127);
    }
    fd = open (log ? log : "/dev/null",
               O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    null = open ("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd == -1 || null == -1 || dup2 (null, 0) == -1 ||
        dup2 (fd, 1) == -1 || dup2 (fd, 2) == -1)
      _exit (127);
    if (background)
      setsid ();
    execvp (argv[0], argv);
    fprintf (stderr, "%s: cannot run %s: %s\n", progname, argv[0],
             strerror (errno));
    _exit (127);
  }
  return pid;
}

static int
run_wait (char **argv, const char *log)
{
  int status;
  pid_t pid = spawn (argv, log, false);
  if (waitpid (pid, &status, 0) == -1)
    die ("waitpid: %m");
  return WIFEXITED (status) ? WEXITSTATUS (status) : 128 + WTERMSIG (status);
}

/* Starts a program that outlives us, in a session of its own, with
 * its output to log, and returns its pid.  It is a grandchild whose
 * parent has gone before it runs: nbdkit -f ties its life to its
 * parent's (PR_SET_PDEATHSIG), and nbdkit in the background sends its
 * errors to /dev/null, so this is how it runs in the foreground,
 * logging, without dying with us.  It waits to be told to go on *go
 * (one byte, then close it): record the pid first.  If we die before,
 * it never runs.
 */
static pid_t
spawn_detached (char **argv, const char *log, int *go)
{
  int pfd[2], gfd[2];
  pid_t mid, pid = -1;

  if (pipe2 (pfd, O_CLOEXEC) == -1 || pipe2 (gfd, O_CLOEXEC) == -1)
    die ("pipe: %m");
  mid = fork ();
  if (mid == -1)
    die ("fork: %m");
  if (mid == 0) {
    pid_t child;
    int fd, null;
    char c;

    setsid ();
    child = fork ();
    if (child != 0) {
      ssize_t r = write (pfd[1], &child, sizeof child);
      _exit (child == -1 || r != sizeof child);
    }
    close (gfd[1]);
    if (read (gfd[0], &c, 1) != 1)
      _exit (127);              /* the helper died */
    fd = open (log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    null = open ("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd == -1 || null == -1 || dup2 (null, 0) == -1 ||
        dup2 (fd, 1) == -1 || dup2 (fd, 2) == -1)
      _exit (127);
    execvp (argv[0], argv);
    fprintf (stderr, "%s: cannot run %s: %s\n", progname, argv[0],
             strerror (errno));
    _exit (127);
  }
  close (pfd[1]);
  close (gfd[0]);
  if (read (pfd[0], &pid, sizeof pid) != sizeof pid)
    pid = -1;
  close (pfd[0]);
  waitpid (mid, NULL, 0);       /* the grandchild now has another parent */
  if (pid <= 0)
    die ("cannot start %s", argv[0]);
  *go = gfd[1];
  return pid;
}

/* Whether a process exists and is not a zombie: a daemon that died
 * stays one until its parent (often init) reaps it.
 */
/* Reads /proc/PID/NAME into buf (NUL-terminated, cut at size - 1).
 * Returns the length, or -1 if the process or file is not there.
 */
static ssize_t
read_proc (long pid, const char *name, char *buf, size_t size)
{
  char *path = xasprintf ("/proc/%ld/%s", pid, name);
  FILE *fp = fopen (path, "r");
  size_t n;

  free (path);
  if (fp == NULL)
    return -1;
  n = fread (buf, 1, size - 1, fp);
  fclose (fp);
  buf[n] = '\0';
  return (ssize_t) n;
}

static bool
process_running (pid_t pid)
{
  char buf[512];
  const char *paren;

  if (read_proc (pid, "stat", buf, sizeof buf) == -1)
    return false;
  paren = strrchr (buf, ')');
  return paren && paren[1] == ' ' && paren[2] != 'Z' && paren[2] != 'X';
}

/* Whether a process is one of ours (nbdkit or nbdfuse), running. */
static bool
our_program (long pid)
{
  char comm[64];

  if (pid <= 1 || read_proc (pid, "comm", comm, sizeof comm) == -1)
    return false;
  if (strncmp (comm, "nbdkit", 6) != 0 && strncmp (comm, "nbdfuse", 7) != 0)
    return false;
  return process_running ((pid_t) pid);
}

/* The pid in a pidfile, if that process is still the nbdkit or
 * nbdfuse we started with that pidfile, and not a zombie: a pid may
 * have been reused since, even by another nbdkit, which is not ours to
 * stop.
 */
static pid_t
read_pidfile (const char *path)
{
  FILE *fp = fopen (path, "r");
  long pid = 0;
  static char cmdline[65536];
  ssize_t len;
  size_t n;
  bool ours = false;

  if (fp) {
    if (fscanf (fp, "%ld", &pid) != 1)
      pid = 0;
    fclose (fp);
  }
  if (pid <= 1)
    return 0;
  len = read_proc (pid, "cmdline", cmdline, sizeof cmdline);
  if (len == -1)
    return 0;
  n = (size_t) len;
  /* argv[0] is nbdkit or nbdfuse, and the pidfile is one of its
   * arguments (nbdkit --pidfile PATH, nbdfuse -P PATH).
   */
  {
    const char *base = strrchr (cmdline, '/') ? strrchr (cmdline, '/') + 1
      : cmdline;
    if (strcmp (base, "nbdkit") != 0 && strcmp (base, "nbdfuse") != 0)
      return 0;
  }
  for (size_t i = strlen (cmdline) + 1; i < n; i += strlen (cmdline + i) + 1)
    if (strcmp (cmdline + i, path) == 0)
      ours = true;
  return ours && process_running ((pid_t) pid) ? (pid_t) pid : 0;
}

/* Sends SIGTERM, waits, then SIGKILL. */
static void
stop_pid (pid_t pid)
{
  if (pid <= 1 || kill (pid, SIGTERM) == -1)
    return;
  for (int i = 0; i < WAIT_SECONDS * 10; i++) {
    waitpid (pid, NULL, WNOHANG);
    if (kill (pid, 0) == -1 || !process_running (pid))
      return;
    sleep_ms (100);
  }
  kill (pid, SIGKILL);
  waitpid (pid, NULL, WNOHANG);
}

static char *
tail_of (const char *path)
{
  FILE *fp = fopen (path, "r");
  static char buf[2048];
  size_t n = 0;
  if (fp) {
    if (fseek (fp, -(long) (sizeof buf - 1), SEEK_END) == -1)
      rewind (fp);
    n = fread (buf, 1, sizeof buf - 1, fp);
    fclose (fp);
  }
  buf[n] = '\0';
  return buf;
}

/* nbdkit sets its umask to 022 and nbdfuse writes its pidfile 0644:
 * close what they made in the run directory to everyone but us (the
 * directory's 0700 already did; this keeps it so if it is ever opened).
 */
static void
make_private (const char *path)
{
  struct stat st;

  if (lstat (path, &st) == 0 && !S_ISLNK (st.st_mode) &&
      (st.st_mode & 077) != 0 && chmod (path, st.st_mode & 0700) == -1)
    die ("chmod %s: %m", path);
}

/* Where the filter and the plugin are: beside this program (the build
 * tree), else installed in nbdkit's directories.
 */
static char *
module_path (const char *env, const char *file, const char *installed)
{
  char self[PATH_MAX];
  ssize_t n;

  const char *given = getenv (env);

  if (given)
    return strdup (given);
  n = readlink ("/proc/self/exe", self, sizeof self - 1);
  if (n > 0) {
    char *slash, *p;
    self[n] = '\0';
    slash = strrchr (self, '/');
    if (slash) {
      *slash = '\0';
      /* helper/backupaccess-helper in the build tree: modules one up. */
      p = xasprintf ("%s/../%s", self, file);
      if (access (p, R_OK) == 0)
        return p;
      free (p);
      p = xasprintf ("%s/%s", self, file);
      if (access (p, R_OK) == 0)
        return p;
      free (p);
    }
  }
  return strdup (installed);
}

/* ------------------------------------------------------------------ */
/* setup: the QMP sequences */

struct setup_opts {
  const char *qmp;
  const char *backend;          /* auto, proxmox, upstream */
  const char *target_id;
  const char *bitmap;           /* live bitmap (upstream) / bitmap id */
  const char *bitmap_mode;      /* none, new, use (proxmox) */
  const char *fleecing_dir;
  int64_t cluster;
  char **devs;
  int ndevs;
};

static bool
proxmox_api_available (void)
{
  char err[1024];
  int qemu_error;
  json_object *r = ba_qmp_cmd (qmp, "query-proxmox-support", NULL,
                               &qemu_error, err, sizeof err);
  bool ok = get_bool (r, "backup-access-api");

  if (r == NULL && !qemu_error)
    die ("QMP query-proxmox-support: %s", err);
  json_object_put (r);
  return ok;
}

/* Which form of backup-access-setup this QEMU takes, from its schema:
 * "devices" (current) or "devlist" (the first version).
 */
static const char *
proxmox_setup_form (void)
{
  json_object *schema = qmp_list ("query-qmp-schema", NULL);
  const char *arg_type = NULL, *form = NULL;
  size_t n = alen (schema);

  for (size_t i = 0; i < n; i++) {
    json_object *e = json_object_array_get_idx (schema, i);
    if (strcmp (get_str (e, "name") ?: "", "backup-access-setup") == 0 &&
        strcmp (get_str (e, "meta-type") ?: "", "command") == 0)
      arg_type = get_str (e, "arg-type");
  }
  for (size_t i = 0; arg_type && i < n; i++) {
    json_object *e = json_object_array_get_idx (schema, i), *members;
    if (strcmp (get_str (e, "name") ?: "", arg_type) != 0 ||
        !json_object_object_get_ex (e, "members", &members))
      continue;
    for (size_t j = 0; j < alen (members); j++) {
      const char *m = get_str (json_object_array_get_idx (members, j),
                               "name");
      if (m && (strcmp (m, "devices") == 0 || strcmp (m, "devlist") == 0))
        form = strcmp (m, "devices") == 0 ? "devices" : "devlist";
    }
  }
  json_object_put (schema);
  if (form == NULL)
    die ("this QEMU reports backup-access-api, but its schema has no "
         "backup-access-setup with 'devices' or 'devlist'");
  return form;
}

/* The provider's vocabulary for Proxmox's bitmap-action. */
static const char *
bitmap_mode_of_action (const char *action)
{
  if (action == NULL)
    return "none";
  if (strcmp (action, "used") == 0)
    return "reuse";
  if (strcmp (action, "new") == 0 || strcmp (action, "invalid") == 0 ||
      strcmp (action, "missing-recreated") == 0)
    return "new";
  return "none";
}

/* Checks made before anything is changed: the API's form, and the
 * fleecing nodes vzdump adds.
 */
static const char *
preflight_proxmox (const struct setup_opts *o)
{
  const char *form = proxmox_setup_form ();
  json_object *nodes = named_nodes ();

  for (int i = 0; i < o->ndevs; i++) {
    char *fl = xasprintf ("%s-fleecing", o->devs[i]);
    if (find_node (nodes, fl) == NULL)
      die ("device %s: fleecing node '%s' not found: add a qcow2 node of "
           "the same size with discard=unmap first", o->devs[i], fl);
    free (fl);
  }
  json_object_put (nodes);
  return form;
}

static void
setup_proxmox (const struct setup_opts *o, const char *form)
{
  json_object *nodes = named_nodes (), *args, *result;
  json_object *devs = devices ();

  if (strcmp (form, "devices") == 0) {
    json_object *list = json_object_new_array ();
    for (int i = 0; i < o->ndevs; i++)
      json_object_array_add (list, obj ("device", S (o->devs[i]),
                                        "bitmap-mode", S (o->bitmap_mode),
                                        END));
    args = obj ("target-id", S (o->target_id), "devices", list, END);
  }
  else {
    char *devlist = NULL;
    for (int i = 0; i < o->ndevs; i++) {
      char *d = xasprintf ("%s%s%s", devlist ? devlist : "",
                           devlist ? "," : "", o->devs[i]);
      free (devlist);
      devlist = d;
    }
    args = obj ("target-id", S (o->target_id), "devlist", S (devlist), END);
    if (strcmp (o->bitmap_mode, "none") != 0)
      json_object_object_add (args, "bitmap-name", S (o->bitmap));
    free (devlist);
  }
  /* Recorded first: teardown must call backup-access-teardown even if
   * we die right after QEMU set it up.
   */
  json_object_object_add (state, "proxmox-setup",
                          json_object_new_boolean (1));
  save_state ();
  result = qmp_list ("backup-access-setup", args);

  for (size_t i = 0; i < alen (result); i++) {
    json_object *r = json_object_array_get_idx (result, i);
    json_object *d = json_object_new_object ();
    const char *dev = get_str (r, "device");
    char *fl;
    bool asked = false;

    if (dev == NULL || get_str (r, "node-name") == NULL)
      die ("backup-access-setup returned an entry without device/node-name");
    /* The device names file names and nbdkit's export=, the bitmap name
     * nbdkit's backupaccess-bitmap=: both as plain as the user's.
     */
    check_name ("device returned by QEMU", dev, false);
    for (int j = 0; j < o->ndevs; j++)
      asked |= strcmp (o->devs[j], dev) == 0;
    if (!asked)
      die ("backup-access-setup returned device '%s', which was not asked "
           "for", dev);
    fl = xasprintf ("%s-fleecing", dev);
    if (get_str (r, "bitmap-name"))
      check_name ("bitmap name returned by QEMU", get_str (r, "bitmap-name"),
                  true);
    set_str (d, "device", dev);
    set_str (d, "export", dev);
    set_str (d, "node", get_str (r, "node-name"));
    json_object_object_add (d, "size",
                            json_object_new_int64 (get_int (r, "size", 0)));
    set_str (d, "bitmap-mode",
             bitmap_mode_of_action (get_str (r, "bitmap-action")));
    set_str (d, "bitmap-name", get_str (r, "bitmap-name"));
    set_str (d, "bitmap-node", get_str (r, "bitmap-node-name"));
    set_str (d, "fleece-node", fl);
    json_object_object_add (d, "cluster-size", json_object_new_int64
                            (ba_cbw_cluster (node_image_int
                                          (find_node (nodes, fl),
                                           "cluster-size"))));
    json_object_array_add (devs, d);
    free (fl);
  }
  json_object_put (result);
  json_object_put (nodes);
  save_state ();
}

/* The block node of a device: a node name, or a drive's or qdev's
 * block backend.  Dies if there is none.
 */
static char *
resolve_device (const char *dev)
{
  json_object *nodes = named_nodes ();
  json_object *blk = qmp_list ("query-block", NULL);
  const char *source = NULL;
  char *r;

  if (dev == NULL)
    die ("no device given");
  if (find_node (nodes, dev))
    source = dev;
  for (size_t j = 0; source == NULL && j < alen (blk);
       j++) {
    json_object *b = json_object_array_get_idx (blk, j), *ins;
    if ((strcmp (get_str (b, "device") ?: "", dev) == 0 ||
         strcmp (get_str (b, "qdev") ?: "", dev) == 0) &&
        json_object_object_get_ex (b, "inserted", &ins))
      source = get_str (ins, "node-name");
  }
  if (source == NULL)
    die ("device %s: no such block node or drive in this QEMU", dev);
  r = strdup (source);
  json_object_put (nodes);
  json_object_put (blk);
  return r;
}

/* The bitmaps of a source node that matter to a new backup: the live
 * one, and what unfinished backups left behind.  Those are ours
 * ("ba-TAG-N-frozen": the changes frozen for a backup; "ba-TAG-N-full":
 * the live bitmap was made by a full backup) and belong to no running
 * backup job "ba-TAG-N": QEMU stopped during that backup, saved them,
 * and was started again.
 */
struct bitmaps_seen {
  bool live, live_inconsistent, live_recording, live_persistent;
  bool full_left, inconsistent_left;
  char **left;                  /* leftover bitmaps */
  bool *left_frozen;            /* ... a frozen copy (else a marker) */
  size_t nleft;
};

static bool
has_suffix (const char *s, const char *suffix)
{
  size_t n = strlen (s), m = strlen (suffix);
  return n >= m && strcmp (s + n - m, suffix) == 0;
}

static void
scan_bitmaps (json_object *node, const char *live, struct bitmaps_seen *b)
{
  json_object *dirty, *jobs = qmp_run (false, "query-block-jobs", NULL);
  size_t n = 0;

  memset (b, 0, sizeof *b);
  if (node == NULL || !json_object_object_get_ex (node, "dirty-bitmaps",
                                                  &dirty)) {
    json_object_put (jobs);
    return;
  }
  n = json_object_array_length (dirty);
  b->left = calloc (n + 1, sizeof *b->left);
  b->left_frozen = calloc (n + 1, sizeof *b->left_frozen);
  if (b->left == NULL || b->left_frozen == NULL)
    die ("out of memory");
  for (size_t j = 0; j < n; j++) {
    json_object *bm = json_object_array_get_idx (dirty, j);
    const char *name = get_str (bm, "name");
    bool frozen, running = false;
    size_t len;

    if (name == NULL)
      continue;
    if (strcmp (name, live) == 0) {
      b->live = true;
      b->live_inconsistent = get_bool (bm, "inconsistent");
      b->live_recording = get_bool (bm, "recording");
      b->live_persistent = get_bool (bm, "persistent");
      continue;
    }
    frozen = has_suffix (name, "-frozen");
    if (strncmp (name, "ba-", 3) != 0 ||
        !(frozen || has_suffix (name, "-full")) || get_bool (bm, "busy"))
      continue;
    len = strlen (name) - strlen (frozen ? "-frozen" : "-full");
    for (size_t k = 0; k < json_object_array_length (jobs); k++) {
      const char *job = get_str (json_object_array_get_idx (jobs, k),
                                 "device");
      if (job && strlen (job) == len && strncmp (job, name, len) == 0)
        running = true;
    }
    if (running)
      continue;
    if (get_bool (bm, "inconsistent"))
      b->inconsistent_left = true;
    if (!frozen)
      b->full_left = true;
    b->left_frozen[b->nleft] = frozen && !get_bool (bm, "inconsistent");
    b->left[b->nleft++] = strdup (name);
  }
  json_object_put (jobs);
}

static void
free_bitmaps_seen (struct bitmaps_seen *b)
{
  for (size_t j = 0; j < b->nleft; j++)
    free (b->left[j]);
  free (b->left);
  free (b->left_frozen);
}

/* Upstream QEMU (7.2 and later), by hand: fleecing image, a frozen copy
 * of the bitmap and copy-before-write inserted in one transaction, then
 * snapshot-access with discard.
 */
static void
setup_upstream (const struct setup_opts *o)
{
  json_object *devs = devices ();
  char tag[16];

  snprintf (tag, sizeof tag, "%06lx",
            ((unsigned long) getpid () * 2654435761UL ^
             (unsigned long) time (NULL)) & 0xffffff);
  set_str (state, "tag", tag);

  for (int i = 0; i < o->ndevs; i++) {
    const char *dev = o->devs[i];
    json_object *nodes = named_nodes (), *node, *d, *actions;
    char *source = resolve_device (dev);
    const char *mode = "none";
    char *fleece_file, *cluster_opt, *size_str;
    /* Names of our own, unique to this setup: teardown may delete
     * whatever the state file names, so nothing of anybody else's may
     * carry such a name.  QEMU allows node names of 31 characters.
     */
    char *fleece_node = xasprintf ("ba-%s-%d-fleece", tag, i);
    char *cbw_node = xasprintf ("ba-%s-%d-cbw", tag, i);
    char *snap_node = xasprintf ("ba-%s-%d-snapshot", tag, i);
    char *frozen = NULL, *job = xasprintf ("ba-%s-%d", tag, i);
    char *marker = NULL;
    bool persistent = false;
    int64_t size;

    node = find_node (nodes, source);
    size = node_image_int (node, "virtual-size");
    if (size <= 0)
      die ("device %s: cannot learn its size", dev);

    d = json_object_new_object ();
    set_str (d, "device", dev);
    set_str (d, "export", dev);
    set_str (d, "source-node", source);
    json_object_object_add (d, "size", json_object_new_int64 (size));
    json_object_object_add (d, "cluster-size",
                            json_object_new_int64 (ba_cbw_cluster (o->cluster)));
    json_object_array_add (devs, d);

    /* The fleecing image: recorded before it exists. */
    fleece_file = xasprintf ("%s/%s.%s.fleecing.qcow2", o->fleecing_dir,
                             dev, tag);
    set_str (d, "fleece-file", fleece_file);
    save_state ();
    {
      /* Never overwrite a file that is not ours. */
      int fd = open (fleece_file, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                     0600);
      if (fd == -1)
        die ("%s: %m", fleece_file);
      close (fd);
    }
    cluster_opt = xasprintf ("cluster_size=%" PRIi64, o->cluster);
    size_str = xasprintf ("%" PRIi64, size);
    {
      char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", "-o",
                       cluster_opt, fleece_file, size_str, NULL };
      char *log = xasprintf ("%s/qemu-img.log", run_dir);
      if (run_wait (argv, log) != 0)
        die ("qemu-img create %s failed: %s", fleece_file, tail_of (log));
      free (log);
    }
    set_str (d, "fleece-node", fleece_node);
    save_state ();
    json_object_put (qmp_run (false, "blockdev-add", obj (
      "driver", S ("qcow2"), "node-name", S (fleece_node),
      "discard", S ("unmap"),
      "file", obj ("driver", S ("file"), "filename", S (fleece_file), END),
      END)));

    actions = json_object_new_array ();
    if (o->bitmap) {
      struct bitmaps_seen b;
      const char *why = NULL;

      scan_bitmaps (node, o->bitmap, &b);
      /* The live bitmap cannot be trusted: start again with a full
       * backup rather than make an incremental that misses changes.
       */
      if (b.live && b.live_inconsistent)
        why = "is inconsistent: QEMU stopped without saving it (killed?), "
          "so the changes since the last backup are unknown";
      else if (b.live && !b.live_recording)
        why = "is disabled: it did not record every change";
      else if (b.live && b.full_left)
        why = "was made by a full backup that never finished (QEMU "
          "stopped during it)";
      else if (b.live && b.inconsistent_left)
        why = "lacks the changes frozen for an unfinished backup, which "
          "QEMU did not save (killed?)";
      if (why) {
        warn ("device %s: bitmap '%s' %s: it is made again, and this "
              "backup is a full one (bitmap-mode new)", dev, o->bitmap, why);
        json_object_put (qmp_run (false, "block-dirty-bitmap-remove", obj (
          "node", S (source), "name", S (o->bitmap), END)));
        b.live = false;
      }
      if (!b.live) {
        char err[1024];
        int qe;
        json_object *r;
        /* A full backup: the frozen copies of unfinished backups add
         * nothing to it.
         */
        for (size_t j = 0; j < b.nleft; j++)
          json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
            "node", S (source), "name", S (b.left[j]), END)));
        /* Recorded first: if this backup fails, the bitmap must go, or
         * the next run would take it for the base of an incremental.
         * The marker says the same to a QEMU restarted after a clean
         * shutdown (which saves persistent bitmaps): it is added first,
         * and removed at teardown.
         */
        marker = xasprintf ("ba-%s-%d-full", tag, i);
        set_str (d, "created-bitmap", o->bitmap);
        set_str (d, "marker-bitmap", marker);
        save_state ();
        {
          json_object *args = obj ("node", S (source), "name", S (marker),
                                   "persistent", json_object_new_boolean (1),
                                   "disabled", json_object_new_boolean (1),
                                   END);
          r = ba_qmp_cmd (qmp, "block-dirty-bitmap-add", args, &qe,
                          err, sizeof err);
          json_object_put (args);
          persistent = r != NULL;
          json_object_put (r);
          if (!persistent) {
            if (!qe)
              die ("QMP block-dirty-bitmap-add: %s", err);
            set_str (d, "marker-bitmap", NULL);
            save_state ();
          }
        }
        /* Persistent where the format allows, so that it outlives QEMU. */
        json_object_put (qmp_run (false, "block-dirty-bitmap-add", obj (
          "node", S (source), "name", S (o->bitmap),
          "persistent", json_object_new_boolean (persistent), END)));
        mode = "new";
      }
      else {
        /* Freeze: a disabled copy holds the changes up to now, the live
         * bitmap restarts; atomic with the copy-before-write insertion.
         * The copy is persistent like the live bitmap, so that a QEMU
         * that shuts down during the backup saves it; what such
         * unfinished backups left is merged in here.
         */
        json_object *merge = json_object_new_array ();
        json_object_array_add (merge, S (o->bitmap));
        for (size_t j = 0; j < b.nleft; j++)
          if (b.left_frozen[j])
            json_object_array_add (merge, S (b.left[j]));
        if (b.nleft)
          warn ("device %s: adding the changes of %zu unfinished "
                "backup(s) to this one", dev, b.nleft);
        mode = "reuse";
        frozen = xasprintf ("ba-%s-%d-frozen", tag, i);
        json_object_array_add (actions, obj (
          "type", S ("block-dirty-bitmap-add"), "data",
          obj ("node", S (source), "name", S (frozen),
               "persistent", json_object_new_boolean (b.live_persistent),
               END), END));
        json_object_array_add (actions, obj (
          "type", S ("block-dirty-bitmap-merge"), "data",
          obj ("node", S (source), "target", S (frozen), "bitmaps", merge,
               END), END));
        json_object_array_add (actions, obj (
          "type", S ("block-dirty-bitmap-clear"), "data",
          obj ("node", S (source), "name", S (o->bitmap), END), END));
        json_object_array_add (actions, obj (
          "type", S ("block-dirty-bitmap-disable"), "data",
          obj ("node", S (source), "name", S (frozen), END), END));
        for (size_t j = 0; j < b.nleft; j++)
          json_object_array_add (actions, obj (
            "type", S ("block-dirty-bitmap-remove"), "data",
            obj ("node", S (source), "name", S (b.left[j]), END), END));
      }
      free_bitmaps_seen (&b);
      set_str (d, "live-bitmap", o->bitmap);
    }
    json_object_array_add (actions, obj (
      "type", S ("blockdev-backup"), "data",
      obj ("job-id", S (job), "device", S (source), "target", S (fleece_node),
           "sync", S ("none"), "filter-node-name", S (cbw_node),
           "auto-finalize", json_object_new_boolean (1),
           "auto-dismiss", json_object_new_boolean (1), END), END));
    set_str (d, "job", job);
    set_str (d, "cbw-node", cbw_node);
    set_str (d, "frozen-bitmap", frozen);
    set_str (d, "bitmap-mode", mode);
    save_state ();
    json_object_put (qmp_run (false, "transaction",
                              obj ("actions", actions, END)));

    set_str (d, "node", snap_node);
    save_state ();
    json_object_put (qmp_run (false, "blockdev-add", obj (
      "driver", S ("snapshot-access"), "node-name", S (snap_node),
      "file", S (cbw_node), "discard", S ("unmap"), END)));
    if (frozen) {
      set_str (d, "bitmap-name", frozen);
      set_str (d, "bitmap-node", source);
    }
    save_state ();

    free (fleece_file);
    free (cluster_opt);
    free (size_str);
    free (fleece_node);
    free (cbw_node);
    free (snap_node);
    free (frozen);
    free (marker);
    free (job);
    free (source);
    json_object_put (nodes);
  }
}

/* QEMU's NBD server on a unix socket in the run directory, and an
 * export per device (name = device, writable only for discard).
 */
static void
start_exports (void)
{
  json_object *devs = devices ();
  char *sock = xasprintf ("%s/qemu-nbd.sock", run_dir);

  set_str (state, "nbd-path", sock);
  /* Recorded first, in case we are killed right after QEMU did it; if
   * QEMU refuses (another NBD server runs), it is not ours to stop.
   */
  json_object_object_add (state, "nbd-server-started",
                          json_object_new_boolean (1));
  save_state ();
  {
    json_object *r = qmp_run (true, "nbd-server-start", obj (
      "addr", obj ("type", S ("unix"), "data", obj ("path", S (sock), END),
                   END), END));
    if (r == NULL) {
      json_object_object_add (state, "nbd-server-started", NULL);
      save_state ();
      die ("QMP nbd-server-start failed (is another NBD server running in "
           "this QEMU?)");
    }
    json_object_put (r);
  }
  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    json_object *args = obj ("type", S ("nbd"), "id", S (get_str (d, "export")),
                             "node-name", S (get_str (d, "node")),
                             "name", S (get_str (d, "export")),
                             "writable", json_object_new_boolean (1), END);
    if (get_str (d, "bitmap-name")) {
      json_object *b = json_object_new_array ();
      json_object_array_add (b, obj ("node", S (get_str (d, "bitmap-node")),
                                     "name", S (get_str (d, "bitmap-name")),
                                     END));
      json_object_object_add (args, "bitmaps", b);
    }
    json_object_object_add (d, "exported", json_object_new_boolean (1));
    save_state ();
    {
      json_object *r = qmp_run (true, "block-export-add", args);
      if (r == NULL) {
        json_object_object_add (d, "exported", NULL);
        save_state ();
        die ("QMP block-export-add for %s failed", get_str (d, "export"));
      }
      json_object_put (r);
    }
    {
      char *p = xasprintf ("%s/qemu-nbd.sock", run_dir);
      set_str (d, "nbd-path", p);
      free (p);
    }
  }
  save_state ();
  free (sock);
}

/* ------------------------------------------------------------------ */
/* teardown */

static bool
teardown_qemu (bool success)
{
  json_object *devs = devices ();
  bool proxmox = strcmp (get_str (state, "backend") ?: "", "proxmox") == 0;

  /* Exports first: an exported bitmap is busy, and merging it back
   * would fail (or abort QEMU).
   */
  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    if (get_bool (d, "exported")) {
      json_object *r = qmp_run (true, "block-export-del",
                                obj ("id", S (get_str (d, "export")), END));
      json_object_put (r);
      wait_gone ("query-block-exports", "id", get_str (d, "export"));
      json_object_object_add (d, "exported", NULL);
      save_state ();
    }
  }
  if (get_bool (state, "nbd-server-started")) {
    json_object_put (qmp_run (true, "nbd-server-stop", NULL));
    json_object_object_add (state, "nbd-server-started", NULL);
    save_state ();
  }

  if (proxmox) {
    if (get_bool (state, "proxmox-setup")) {
      /* Errors are reported, not fatal: vzdump does the same. */
      json_object_put (qmp_run (true, "backup-access-teardown", obj (
        "target-id", S (get_str (state, "target-id")),
        "success", json_object_new_boolean (success), END)));
      json_object_object_add (state, "proxmox-setup", NULL);
      save_state ();
    }
    return true;
  }

  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    const char *source = get_str (d, "source-node");
    const char *frozen = get_str (d, "frozen-bitmap");
    const char *live = get_str (d, "live-bitmap");
    json_object *nodes = named_nodes ();

    if (get_str (d, "node") && find_node (nodes, get_str (d, "node")))
      json_object_put (qmp_run (true, "blockdev-del",
                                obj ("node-name", S (get_str (d, "node")),
                                     END)));
    if (get_str (d, "job")) {
      /* Cancelling the sync=none job removes copy-before-write. */
      json_object_put (qmp_run (true, "block-job-cancel", obj (
        "device", S (get_str (d, "job")),
        "force", json_object_new_boolean (1), END)));
      wait_gone ("query-block-jobs", "device", get_str (d, "job"));
    }
    if (frozen && source) {
      if (node_has_bitmap (nodes, source, frozen)) {
        /* On failure the next incremental must still see every change. */
        if (!success && live) {
          json_object *list = json_object_new_array ();
          json_object_array_add (list, S (frozen));
          json_object_put (qmp_run (false, "block-dirty-bitmap-merge", obj (
            "node", S (source), "target", S (live), "bitmaps", list, END)));
        }
        json_object_put (qmp_run (false, "block-dirty-bitmap-remove",
                                  obj ("node", S (source),
                                       "name", S (frozen), END)));
      }
    }
    if (!success && source && get_str (d, "created-bitmap")) {
      /* A full backup that failed: no base for an incremental. */
      json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
        "node", S (source), "name", S (get_str (d, "created-bitmap")),
        END)));
    }
    /* Only now, after that: the live bitmap can be trusted. */
    if (source && get_str (d, "marker-bitmap") &&
        node_has_bitmap (nodes, source, get_str (d, "marker-bitmap")))
      json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
        "node", S (source), "name", S (get_str (d, "marker-bitmap")),
        END)));
    if (get_str (d, "fleece-node") && find_node (nodes,
                                                 get_str (d, "fleece-node")))
      json_object_put (qmp_run (true, "blockdev-del", obj (
        "node-name", S (get_str (d, "fleece-node")), END)));
    json_object_put (nodes);
    if (get_str (d, "fleece-file") && unlink (get_str (d, "fleece-file"))
        == -1 && errno != ENOENT)
      warn ("removing %s: %m", get_str (d, "fleece-file"));
    json_object_object_add (d, "job", NULL);
    json_object_object_add (d, "frozen-bitmap", NULL);
    json_object_object_add (d, "marker-bitmap", NULL);
    json_object_object_add (d, "node", NULL);
    json_object_object_add (d, "fleece-node", NULL);
    save_state ();
  }
  return true;
}

/* What nbdkit's log says, before teardown removes it: the filter's
 * summary, and the last errors.
 */
static void
report_log (const char *dev, const char *log)
{
  FILE *fp = fopen (log, "r");
  char line[1024], last[3][1024];
  unsigned errors = 0;

  if (fp == NULL)
    return;
  while (fgets (line, sizeof line, fp)) {
    line[strcspn (line, "\n")] = '\0';
    if (strstr (line, "backupaccess: summary:"))
      warn ("device %s: %s", dev, line);
    else if (strstr (line, " error: ")) {
      snprintf (last[errors % 3], sizeof last[0], "%s", line);
      errors++;
    }
  }
  fclose (fp);
  if (errors)
    warn ("device %s: nbdkit logged %u error(s), the last:", dev, errors);
  for (unsigned i = errors > 3 ? errors - 3 : 0; i < errors; i++)
    warn ("  %s", last[i % 3]);
}

/* Whether a directory is a mount point, from /proc/self/mounts. */
static bool
is_mounted (const char *dir)
{
  FILE *fp = fopen ("/proc/self/mounts", "r");
  char line[4096];
  bool found = false;

  if (fp == NULL)
    return true;                /* cannot tell: try to unmount */
  while (!found && fgets (line, sizeof line, fp)) {
    char *sp = strchr (line, ' ');
    size_t n = strlen (dir);
    /* Field 2; our paths have no characters that mounts escapes. */
    if (sp && strncmp (sp + 1, dir, n) == 0 && sp[1 + n] == ' ')
      found = true;
  }
  fclose (fp);
  return found;
}

/* Whether the command line of a process has an argument containing
 * text.
 */
static bool
cmdline_mentions (long pid, const char *text)
{
  static char buf[65536];
  ssize_t n = read_proc (pid, "cmdline", buf, sizeof buf);

  for (ssize_t i = 0; i < n; i += (ssize_t) strlen (buf + i) + 1)
    if (strstr (buf + i, text))
      return true;
  return false;
}

/* What a helper killed while it started nbdkit or nbdfuse may have left
 * without a record: such processes with an argument in the run
 * directory (private to us, so they are ours), and mounts in it.
 */
static void
stop_strays (void)
{
  char *prefix = xasprintf ("%s/", run_dir);
  DIR *dir = opendir ("/proc");
  FILE *fp;
  struct dirent *e;
  char line[4096];

  while (dir && (e = readdir (dir)) != NULL) {
    long pid = strtol (e->d_name, NULL, 10);
    if (our_program (pid) && cmdline_mentions (pid, prefix)) {
      warn ("stopping %ld, left by a helper that was killed", pid);
      stop_pid ((pid_t) pid);
    }
  }
  if (dir)
    closedir (dir);
  fp = fopen ("/proc/self/mounts", "r");
  while (fp && fgets (line, sizeof line, fp)) {
    char *mnt = strchr (line, ' '), *end;
    if (mnt == NULL || strncmp (mnt + 1, prefix, strlen (prefix)) != 0 ||
        (end = strchr (mnt + 1, ' ')) == NULL)
      continue;
    *end = '\0';
    {
      char *argv[] = { "fusermount3", "-u", "-z", mnt + 1, NULL };
      warn ("unmounting %s, left by a helper that was killed", mnt + 1);
      run_wait (argv, NULL);
      rmdir (mnt + 1);
    }
  }
  if (fp)
    fclose (fp);
  free (prefix);
}

/* Sockets left in the run directory by processes stop_strays ended
 * (they do not remove them): nothing else listens there.
 */
static void
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

static void
stop_local (void)
{
  json_object *devs = devices ();

  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    const char *mnt = get_str (d, "mount");
    if (mnt) {
      char *argv[] = { "fusermount3", "-u", (char *) mnt, NULL };
      char *lazy[] = { "fusermount3", "-u", "-z", (char *) mnt, NULL };
      pid_t pid = get_str (d, "mount-pidfile")
        ? read_pidfile (get_str (d, "mount-pidfile")) : 0;
      if (run_wait (argv, NULL) != 0 && is_mounted (mnt)) {
        /* Busy: a process still has the file open.  Detached now, gone
         * when it closes the file; its reads fail once nbdfuse stops.
         */
        warn ("device %s: %s is busy (a process has the file open): "
              "unmounted lazily", get_str (d, "device"), mnt);
        run_wait (lazy, NULL);
      }
      stop_pid (pid);
      if (get_str (d, "mount-pidfile"))
        unlink (get_str (d, "mount-pidfile"));
      rmdir (mnt);
      json_object_object_add (d, "mount", NULL);
      save_state ();
    }
    if (get_str (d, "pidfile")) {
      pid_t pid = read_pidfile (get_str (d, "pidfile"));
      long started = (long) get_int (d, "nbdkit-pid", 0);
      /* Not listening yet, or never told to go on. */
      if (pid == 0 && process_running ((pid_t) started) &&
          cmdline_mentions (started, run_dir))
        pid = (pid_t) started;
      stop_pid (pid);
      if (get_str (d, "nbdkit-log"))
        report_log (get_str (d, "device"), get_str (d, "nbdkit-log"));
      unlink (get_str (d, "pidfile"));
      if (get_str (d, "socket"))
        unlink (get_str (d, "socket"));
      json_object_object_add (d, "pidfile", NULL);
      save_state ();
    }
  }
  stop_strays ();
}

/* ------------------------------------------------------------------ */
/* serve, mount, status */
/* A path as a URI query value: '&', '#', '%', spaces, anything not
 * plain is percent-encoded (libnbd decodes it), so that a directory's
 * name can neither break the URI nor add parameters to it.
 */
static char *
uri_escape (const char *s)
{
  char *out = malloc (strlen (s) * 3 + 1), *p = out;

  if (out == NULL)
    die ("out of memory");
  for (; *s; s++) {
    unsigned char c = *s;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
        (c >= '0' && c <= '9') || strchr ("-._~/", c))
      *p++ = c;
    else
      p += sprintf (p, "%%%02X", c);
  }
  *p = '\0';
  return out;
}


/* How serve exposes nbdkit: a unix socket in the run directory, or TCP
 * (--listen), with TLS (--tls-psk) unless --insecure-no-tls.
 */
struct serve_opts {
  int64_t bandwidth;
  const char *listen;           /* HOST:PORT, or NULL */
  const char *tls_psk;          /* PSK file, or NULL */
  bool insecure_no_tls;
};

/* The user name of a PSK file ("USER:HEXKEY" lines, as psktool(1)
 * writes them), after checking that only its owner (root or the caller)
 * can read it and that its first key is long enough.
 */
static char *
psk_user (const char *path)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
  struct stat st;
  char line[1024], *colon, *user;
  FILE *fp;
  size_t i, hex;

  if (fd == -1)
    die ("--tls-psk %s: %m", path);
  if (fstat (fd, &st) == -1)
    die ("--tls-psk %s: %m", path);
  if (!S_ISREG (st.st_mode))
    die ("--tls-psk %s: not a regular file", path);
  if ((st.st_uid != 0 && st.st_uid != geteuid ()) || (st.st_mode & 077))
    die ("--tls-psk %s: must be owned by root or you and readable by its "
         "owner only (chmod 600)", path);
  fp = fdopen (fd, "r");
  if (fp == NULL)
    die ("--tls-psk %s: %m", path);
  if (fgets (line, sizeof line, fp) == NULL)
    line[0] = '\0';
  fclose (fp);
  line[strcspn (line, "\r\n")] = '\0';
  colon = strchr (line, ':');
  for (i = 0; colon && line + i < colon; i++)
    if (!((line[i] >= 'a' && line[i] <= 'z') ||
          (line[i] >= 'A' && line[i] <= 'Z') ||
          (line[i] >= '0' && line[i] <= '9') || strchr ("-._", line[i])))
      break;
  for (hex = 0; colon && colon[1 + hex] &&
         strchr ("0123456789abcdefABCDEF", colon[1 + hex]); hex++)
    ;
  if (colon == NULL || colon == line || line + i != colon ||
      colon[1 + hex] != '\0' || hex % 2 != 0 || hex < 32)
    die ("--tls-psk %s: the first line must be USER:HEXKEY (a user name of "
         "letters, digits, '-', '.', '_' and a key of at least 16 bytes), "
         "as 'psktool -u USER -p FILE' writes it", path);
  user = strndup (line, colon - line);
  if (user == NULL)
    die ("out of memory");
  return user;
}

/* HOST:PORT, [IPV6]:PORT. */
static void
parse_listen (const char *listen, char **host, int *port, int ndevs)
{
  const char *colon = strrchr (listen, ':');
  char *end;
  long p;
  size_t n;

  if (colon == NULL || colon == listen)
    die ("--listen %s: expected HOST:PORT", listen);
  errno = 0;
  p = strtol (colon + 1, &end, 10);
  if (errno || end == colon + 1 || *end || p < 1 || p + ndevs - 1 > 65535)
    die ("--listen %s: the port must be 1 to 65535, and one more per "
         "further device", listen);
  n = colon - listen;
  if (listen[0] == '[' && n > 2 && listen[n - 1] == ']')
    *host = strndup (listen + 1, n - 2);
  else
    *host = strndup (listen, n);
  if (*host == NULL)
    die ("out of memory");
  for (const char *c = *host; *c; c++)
    if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
          (*c >= '0' && *c <= '9') || strchr ("-.:", *c)))
      die ("--listen %s: not a host name or an IP address", listen);
  *port = (int) p;
}

/* Checks serve's options (also before run sets anything up); returns
 * the host, port and PSK user when asked for them.
 */
static void
serve_preflight (const struct serve_opts *so, int ndevs,
                 char **host, int *port, char **user)
{
  char *h = NULL, *u = NULL;
  int p = 0;

  if (so->listen && !so->tls_psk && !so->insecure_no_tls)
    die ("--listen %s: TCP is served with TLS only: give --tls-psk FILE "
         "(or, on a network where anyone may read the disks, "
         "--insecure-no-tls)", so->listen);
  if (so->insecure_no_tls && (!so->listen || so->tls_psk))
    die ("--insecure-no-tls goes with --listen, and without --tls-psk");
  if (so->bandwidth > INT64_MAX / 8)
    die ("--bandwidth-limit: too large");
  if (so->listen)
    parse_listen (so->listen, &h, &p, ndevs > 0 ? ndevs : 1);
  if (so->tls_psk)
    u = psk_user (so->tls_psk);
  if (host)
    *host = h;
  else
    free (h);
  if (port)
    *port = p;
  if (user)
    *user = u;
  else
    free (u);
}

static void
serve_devices (const struct serve_opts *so)
{
  json_object *devs = devices ();
  int64_t bandwidth = so->bandwidth;
  char *host = NULL, *user = NULL, *psk_esc = NULL;
  int port = 0;

  serve_preflight (so, (int) alen (devs), &host, &port, &user);
  if (so->tls_psk)
    psk_esc = uri_escape (so->tls_psk);
  char *filter = module_path ("BACKUPACCESS_FILTER",
                              "nbdkit-backupaccess-filter.so",
                              "backupaccess");
  char *plugin = module_path ("BACKUPACCESS_PLUGIN",
                              "nbdkit-backupaccess-plugin.so",
                              "backupaccess");

  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    const char *dev = get_str (d, "device");
    char *sock = xasprintf ("%s/%s.sock", run_dir, dev);
    char *pidfile = xasprintf ("%s/%s.nbdkit.pid", run_dir, dev);
    char *log = xasprintf ("%s/%s.nbdkit.log", run_dir, dev);
    char *status = xasprintf ("%s/%s.status.json", run_dir, dev);
    char *filter_arg = xasprintf ("--filter=%s", filter);
    char *socket_arg = xasprintf ("socket=%s", get_str (d, "nbd-path"));
    char *export_arg = xasprintf ("export=%s", get_str (d, "export"));
    char *cluster_arg = xasprintf ("backupaccess-cluster=%" PRIi64,
                                   get_int (d, "cluster-size", BA_CLUSTER_DEFAULT));
    char *plugin_cluster_arg = xasprintf ("cluster=%" PRIi64,
                                          get_int (d, "cluster-size", BA_CLUSTER_DEFAULT));
    char *status_arg = xasprintf ("backupaccess-status=%s", status);
    char *bitmap_arg = get_str (d, "bitmap-name")
      ? xasprintf ("backupaccess-bitmap=%s", get_str (d, "bitmap-name"))
      : NULL;
    char *rate_arg = bandwidth > 0
      ? xasprintf ("rate=%" PRIi64, bandwidth * 8) : NULL;
    char *port_arg = xasprintf ("%d", port + (int) i);
    char *psk_arg = so->tls_psk ? xasprintf ("--tls-psk=%s", so->tls_psk)
      : NULL;
    char *argv[24];
    int a = 0, go;
    pid_t pid;

    if (get_str (d, "pidfile") && read_pidfile (get_str (d, "pidfile")) &&
        kill (read_pidfile (get_str (d, "pidfile")), 0) == 0)
      goto next;                /* already served */
    if (get_str (d, "uri"))
      die ("device %s: its nbdkit has gone: what it read is discarded in "
           "QEMU, and a new one would take that for a broken snapshot; this "
           "backup cannot go on: tear it down with --failure (the bitmap "
           "keeps every change) and start again", dev);
    argv[a++] = "nbdkit";
    argv[a++] = "-f";           /* so that its errors reach the log */
    argv[a++] = "--log=stderr";
    argv[a++] = "--pidfile";
    argv[a++] = pidfile;
    if (host) {
      argv[a++] = "-i";
      argv[a++] = host;
      argv[a++] = "-p";
      argv[a++] = port_arg;
    }
    else {
      argv[a++] = "-U";
      argv[a++] = sock;
    }
    if (psk_arg) {
      argv[a++] = "--tls=require";
      argv[a++] = psk_arg;
    }
    if (rate_arg)
      argv[a++] = "--filter=rate";
    argv[a++] = filter_arg;
    argv[a++] = plugin;
    argv[a++] = socket_arg;
    argv[a++] = export_arg;
    argv[a++] = cluster_arg;
    argv[a++] = plugin_cluster_arg;
    argv[a++] = status_arg;
    if (bitmap_arg) {
      argv[a++] = bitmap_arg;
      /* Upstream copy-before-write has no bitmap: it would copy clean
       * clusters, which nobody reads, into the fleecing image.
       */
      if (strcmp (get_str (state, "backend") ?: "", "upstream") == 0)
        argv[a++] = "backupaccess-discard-clean=true";
    }
    if (rate_arg)
      argv[a++] = rate_arg;
    argv[a] = NULL;

    set_str (d, "pidfile", pidfile);
    set_str (d, "socket", host ? NULL : sock);
    set_str (d, "tls-psk", so->tls_psk);
    set_str (d, "status-file", status);
    set_str (d, "nbdkit-log", log);
    save_state ();
    /* Left by an nbdkit that died: ours, in our directory. */
    unlink (pidfile);
    unlink (sock);
    /* It writes the pidfile once it listens. */
    pid = spawn_detached (argv, log, &go);
    json_object_object_add (d, "nbdkit-pid", json_object_new_int64 (pid));
    save_state ();
    if (write (go, "g", 1) != 1)
      die ("starting nbdkit: %m");
    close (go);
    for (int w = 0; w < WAIT_SECONDS * 10 && !read_pidfile (pidfile); w++) {
      if (!process_running (pid))
        die ("device %s: nbdkit failed: %s", dev, tail_of (log));
      sleep_ms (100);
    }
    if (!read_pidfile (pidfile)) {
      stop_pid (pid);
      die ("device %s: nbdkit did not start: %s", dev, tail_of (log));
    }
    /* .after_fork errors end it just after it wrote the pidfile. */
    sleep_ms (200);
    if (!read_pidfile (pidfile))
      die ("device %s: nbdkit exited: %s", dev, tail_of (log));
    make_private (pidfile);
    if (!host)
      make_private (sock);
    {
      char *esc = uri_escape (sock);
      /* IPv6 addresses in brackets; the PSK's user before the host. */
      bool v6 = host && strchr (host, ':');
      char *uri = host
        ? xasprintf ("nbd%s://%s%s%s%s%s:%s/%s%s", psk_esc ? "s" : "",
                     user ? user : "", user ? "@" : "", v6 ? "[" : "", host,
                     v6 ? "]" : "", port_arg, psk_esc ? "?tls-psk-file=" : "",
                     psk_esc ? psk_esc : "")
        : xasprintf ("nbd%s+unix://%s%s/?socket=%s%s%s", psk_esc ? "s" : "",
                     user ? user : "", user ? "@" : "", esc,
                     psk_esc ? "&tls-psk-file=" : "", psk_esc ? psk_esc : "");
      free (esc);
      set_str (d, "uri", uri);
      free (uri);
    }
    save_state ();
  next:
    free (sock);
    free (pidfile);
    free (log);
    free (status);
    free (filter_arg);
    free (socket_arg);
    free (export_arg);
    free (cluster_arg);
    free (plugin_cluster_arg);
    free (status_arg);
    free (bitmap_arg);
    free (rate_arg);
    free (port_arg);
    free (psk_arg);
  }
  free (filter);
  free (plugin);
  free (host);
  free (user);
  free (psk_esc);
}

static json_object *
dirty_regions_of (json_object *d)
{
  json_object *list = json_object_new_array ();
  struct ba_regions dirty;
  uint64_t size;
  char err[1024];

  if (get_str (d, "bitmap-name") == NULL) {
    json_object *r = json_object_new_array ();
    json_object_array_add (r, json_object_new_int64 (0));
    json_object_array_add (r, json_object_new_int64 (get_int (d, "size", 0)));
    json_object_array_add (list, r);
    return list;
  }
  ba_regions_init (&dirty);
  if (ba_bitmap_fetch (NULL, get_str (d, "nbd-path"), get_str (d, "export"),
                       get_str (d, "bitmap-name"), &dirty, &size,
                       err, sizeof err) == -1)
    die ("device %s: %s", get_str (d, "device"), err);
  for (size_t i = 0; i < dirty.n; i++) {
    json_object *r = json_object_new_array ();
    json_object_array_add (r, json_object_new_int64 (dirty.r[i].start));
    json_object_array_add (r, json_object_new_int64 (dirty.r[i].end
                                                     - dirty.r[i].start));
    json_object_array_add (list, r);
  }
  ba_regions_free (&dirty);
  return list;
}

static void
mount_devices (json_object *out)
{
  json_object *devs = devices (), *list = json_object_new_array ();

  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i), *o;
    const char *dev = get_str (d, "device");
    char *mnt = xasprintf ("%s/%s.mnt", run_dir, dev);
    char *file = xasprintf ("%s/%s", mnt, dev);
    char *pidfile = xasprintf ("%s/%s.nbdfuse.pid", run_dir, dev);
    char *log = xasprintf ("%s/%s.nbdfuse.log", run_dir, dev);

    if (get_str (d, "uri") == NULL)
      die ("device %s is not served: run 'serve' first", dev);
    if (get_str (d, "tls-psk"))
      die ("device %s is served with TLS, which nbdfuse cannot use (libnbd "
           "1.14 takes no PSK file from its URI): serve it without "
           "--tls-psk to mount it", dev);
    if (get_str (d, "mount") == NULL) {
      /* No allow_other: only the caller can open the file. */
      char *argv[] = { "nbdfuse", "-P", pidfile, file,
                       (char *) get_str (d, "uri"), NULL };
      /* Recorded first, so that teardown removes it. */
      set_str (d, "mount", mnt);
      set_str (d, "mount-pidfile", pidfile);
      save_state ();
      if (mkdir (mnt, 0700) == -1 && errno != EEXIST)
        die ("mkdir %s: %m", mnt);
      unlink (pidfile);
      pid_t pid = spawn (argv, log, true);
      for (int w = 0; w < WAIT_SECONDS * 10 && !read_pidfile (pidfile); w++) {
        if (waitpid (pid, NULL, WNOHANG) == pid)
          break;                /* it failed */
        sleep_ms (100);
      }
      if (!read_pidfile (pidfile))
        die ("device %s: nbdfuse did not start: %s", dev, tail_of (log));
      make_private (pidfile);
      set_str (d, "file", file);
      save_state ();
    }
    o = json_object_new_object ();
    set_str (o, "device", dev);
    set_str (o, "file", file);
    json_object_object_add (o, "dirty-regions", dirty_regions_of (d));
    json_object_array_add (list, o);
    free (mnt);
    free (file);
    free (pidfile);
    free (log);
  }
  json_object_object_add (out, "mounts", list);
}

static void
print_json (json_object *o)
{
  printf ("%s\n", json_object_to_json_string_ext (o, JSON_C_TO_STRING_PRETTY));
  fflush (stdout);
}

/* The provider's view of the devices. */
static json_object *
describe (void)
{
  json_object *out = json_object_new_object (), *list = json_object_new_array ();
  json_object *devs = devices ();

  set_str (out, "run-dir", run_dir);
  set_str (out, "backend", get_str (state, "backend"));
  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    json_object *o = json_object_new_object ();
    set_str (o, "device", get_str (d, "device"));
    json_object_object_add (o, "size",
                            json_object_new_int64 (get_int (d, "size", 0)));
    set_str (o, "bitmap-mode", get_str (d, "bitmap-mode") ?: "none");
    set_str (o, "bitmap-name", get_str (d, "bitmap-name"));
    set_str (o, "nbd-path", get_str (d, "nbd-path"));
    set_str (o, "export", get_str (d, "export"));
    json_object_object_add (o, "cluster-size", json_object_new_int64
                            (get_int (d, "cluster-size", BA_CLUSTER_DEFAULT)));
    set_str (o, "uri", get_str (d, "uri"));
    set_str (o, "file", get_str (d, "file"));
    json_object_array_add (list, o);
  }
  json_object_object_add (out, "devices", list);
  return out;
}

static int64_t
fleecing_bytes (json_object *d)
{
  struct stat st;
  const char *file = get_str (d, "fleece-file");

  if (file)
    return stat (file, &st) == 0 ? (int64_t) st.st_blocks * 512 : -1;
  if (qmp && get_str (d, "fleece-node")) {
    json_object *nodes = named_nodes ();
    int64_t r = node_image_int (find_node (nodes, get_str (d, "fleece-node")),
                                "actual-size");
    json_object_put (nodes);
    return r;
  }
  return -1;
}

static void
status_command (void)
{
  json_object *out = json_object_new_object (), *list = json_object_new_array ();
  json_object *devs = devices ();

  if (get_str (state, "qmp") &&
      strcmp (get_str (state, "backend") ?: "", "serve") != 0)
    qmp_open (get_str (state, "qmp"));
  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    json_object *o = json_object_new_object (), *st = NULL;
    const char *sf = get_str (d, "status-file");
    set_str (o, "device", get_str (d, "device"));
    if (sf)
      st = json_object_from_file (sf);
    json_object_object_add (o, "bytes-read", json_object_new_int64
                            (get_int (st, "bytes-read", 0)));
    json_object_object_add (o, "bytes-discarded", json_object_new_int64
                            (get_int (st, "bytes-discarded", 0)));
    json_object_object_add (o, "bytes-left", json_object_new_int64
                            (get_int (st, "bytes-left",
                                      get_int (d, "size", 0))));
    json_object_object_add (o, "snapshot-broken",
                            json_object_new_boolean (get_bool (st, "broken")));
    json_object_object_add (o, "fleecing-size",
                            json_object_new_int64 (fleecing_bytes (d)));
    json_object_put (st);
    json_object_array_add (list, o);
  }
  json_object_object_add (out, "devices", list);
  print_json (out);
  json_object_put (out);
}

/* ------------------------------------------------------------------ */
/* Commands */

#define SETUP_USAGE \
  "  setup --qmp SOCKET --run-dir DIR --device DEV [--device DEV ...]\n" \
  "        [--bitmap NAME] [--bitmap-mode none|new|use]\n" \
  "        [--fleecing-dir DIR] [--cluster-size SIZE]\n" \
  "        [--backend auto|proxmox|upstream] [--target-id ID]\n" \
  "      Set up snapshot access in a running QEMU and export it over\n" \
  "      NBD on DIR/qemu-nbd.sock; prints the devices as JSON.\n"
#define SERVE_USAGE \
  "  serve --run-dir DIR [--nbd-path SOCKET --device DEV[:BITMAP] ...\n" \
  "        [--cluster-size SIZE]] [--bandwidth-limit BYTES_PER_S]\n" \
  "        [--listen HOST:PORT] [--tls-psk FILE] [--insecure-no-tls]\n" \
  "      Start nbdkit with the backupaccess filter per device, on\n" \
  "      DIR/DEV.sock (or TCP HOST:PORT, PORT+1, ..., with TLS); prints\n" \
  "      the client URIs as JSON.  Without --nbd-path it serves what\n" \
  "      'setup' exported.\n"
#define MOUNT_USAGE \
  "  mount --run-dir DIR\n" \
  "      nbdfuse per served device (DIR/DEV.mnt/DEV); prints the files\n" \
  "      and their dirty regions.  Open the files with O_DIRECT.\n"
#define STATUS_USAGE \
  "  status --run-dir DIR\n" \
  "      Bytes read, discarded and left, and the fleecing image size.\n"
#define TEARDOWN_USAGE \
  "  teardown --run-dir DIR --success|--failure\n" \
  "      Unmount, stop nbdkit, remove QEMU's exports, then end the\n" \
  "      snapshot access (on failure the bitmap keeps every change).\n" \
  "      Works after a partial setup, and twice.\n"
#define RUN_USAGE \
  "  run SETUP-OR-SERVE-OPTIONS [--mount] -- COMMAND [ARGS...]\n" \
  "      setup (with --qmp) or serve, run COMMAND with\n" \
  "      BACKUPACCESS_JSON, BACKUPACCESS_RUN_DIR and BACKUPACCESS_URI_n\n" \
  "      in its environment, then teardown: --success only when COMMAND\n" \
  "      exited 0; SIGINT/SIGTERM tear down with --failure.\n"

static void
usage (FILE *fp, int status)
{
  fprintf (fp, "Usage: %s COMMAND [OPTIONS]\n\n"
           "Commands:\n" SETUP_USAGE SERVE_USAGE MOUNT_USAGE STATUS_USAGE
           TEARDOWN_USAGE RUN_USAGE
           "\nEach command takes --help.  See backupaccess-helper(1).\n",
           progname);
  exit (status);
}

enum {
  OPT_QMP = 256, OPT_RUN_DIR, OPT_DEVICE, OPT_BITMAP, OPT_BITMAP_MODE,
  OPT_FLEECING_DIR, OPT_CLUSTER, OPT_BACKEND, OPT_TARGET_ID, OPT_NBD_PATH,
  OPT_BANDWIDTH, OPT_SUCCESS, OPT_FAILURE, OPT_MOUNT, OPT_HELP,
  OPT_LISTEN, OPT_TLS_PSK, OPT_INSECURE_NO_TLS,
};

static const struct option long_options[] = {
  { "qmp", required_argument, NULL, OPT_QMP },
  { "run-dir", required_argument, NULL, OPT_RUN_DIR },
  { "device", required_argument, NULL, OPT_DEVICE },
  { "bitmap", required_argument, NULL, OPT_BITMAP },
  { "bitmap-mode", required_argument, NULL, OPT_BITMAP_MODE },
  { "fleecing-dir", required_argument, NULL, OPT_FLEECING_DIR },
  { "cluster-size", required_argument, NULL, OPT_CLUSTER },
  { "backend", required_argument, NULL, OPT_BACKEND },
  { "target-id", required_argument, NULL, OPT_TARGET_ID },
  { "nbd-path", required_argument, NULL, OPT_NBD_PATH },
  { "bandwidth-limit", required_argument, NULL, OPT_BANDWIDTH },
  { "success", no_argument, NULL, OPT_SUCCESS },
  { "failure", no_argument, NULL, OPT_FAILURE },
  { "mount", no_argument, NULL, OPT_MOUNT },
  { "listen", required_argument, NULL, OPT_LISTEN },
  { "tls-psk", required_argument, NULL, OPT_TLS_PSK },
  { "insecure-no-tls", no_argument, NULL, OPT_INSECURE_NO_TLS },
  { "help", no_argument, NULL, OPT_HELP },
  { NULL, 0, NULL, 0 },
};

struct opts {
  struct setup_opts setup;
  const char *nbd_path;
  struct serve_opts serve;
  int success;                  /* -1 unset, 0 failure, 1 success */
  bool mount;
};

static char *
absolute (const char *path)
{
  char cwd[PATH_MAX];

  if (path[0] == '/')
    return strdup (path);
  if (getcwd (cwd, sizeof cwd) == NULL)
    die ("getcwd: %m");
  return xasprintf ("%s/%s", cwd, path);
}

static int64_t
parse_size (const char *what, const char *s)
{
  char *end;
  unsigned long long v;

  errno = 0;
  v = strtoull (s, &end, 10);
  if (errno || end == s || s[0] == '-')
    die ("%s '%s': not a number", what, s);
  switch (*end) {
  case 'k': case 'K':
    if (v > (INT64_MAX >> 10))
      die ("%s '%s': too large", what, s);
    v <<= 10; end++;
    break;
  case 'm': case 'M':
    if (v > (INT64_MAX >> 20))
      die ("%s '%s': too large", what, s);
    v <<= 20; end++;
    break;
  case '\0': break;
  }
  if (*end || v > INT64_MAX)
    die ("%s '%s': not a size (a number, optionally with K or M)", what, s);
  return (int64_t) v;
}

static void
parse_options (int argc, char **argv, struct opts *o, const char *help)
{
  int c;

  memset (o, 0, sizeof *o);
  o->success = -1;
  o->setup.backend = "auto";
  o->setup.cluster = BA_CLUSTER_DEFAULT;
  o->setup.devs = calloc (argc + 1, sizeof (char *));
  while ((c = getopt_long (argc, argv, "+", long_options, NULL)) != -1) {
    switch (c) {
    case OPT_QMP: o->setup.qmp = optarg; break;
    case OPT_RUN_DIR: run_dir = optarg; break;
    case OPT_DEVICE: o->setup.devs[o->setup.ndevs++] = optarg; break;
    case OPT_BITMAP: o->setup.bitmap = optarg; break;
    case OPT_BITMAP_MODE: o->setup.bitmap_mode = optarg; break;
    case OPT_FLEECING_DIR: o->setup.fleecing_dir = optarg; break;
    case OPT_CLUSTER:
      o->setup.cluster = parse_size ("--cluster-size", optarg);
      if (o->setup.cluster < BA_QCOW2_CLUSTER_MIN ||
          o->setup.cluster > BA_QCOW2_CLUSTER_MAX ||
          (o->setup.cluster & (o->setup.cluster - 1)))
        die ("--cluster-size %s: a qcow2 cluster size, a power of two from "
             "512 to 2M", optarg);
      break;
    case OPT_BACKEND: o->setup.backend = optarg; break;
    case OPT_TARGET_ID: o->setup.target_id = optarg; break;
    case OPT_NBD_PATH: o->nbd_path = optarg; break;
    case OPT_BANDWIDTH:
      o->serve.bandwidth = parse_size ("--bandwidth-limit", optarg);
      break;
    case OPT_LISTEN: o->serve.listen = optarg; break;
    case OPT_TLS_PSK: o->serve.tls_psk = optarg; break;
    case OPT_INSECURE_NO_TLS: o->serve.insecure_no_tls = true; break;
    case OPT_SUCCESS: o->success = 1; break;
    case OPT_FAILURE: o->success = 0; break;
    case OPT_MOUNT: o->mount = true; break;
    case OPT_HELP:
      printf ("Usage: %s\n%s", progname, help);
      exit (0);
    default:
      fprintf (stderr, "Usage: %s\n%s", progname, help);
      exit (2);
    }
  }
  if (run_dir == NULL)
    die ("--run-dir DIR is required");
  /* Later commands may run from another directory. */
  {
    char *abs = absolute (run_dir);
    run_dir = checked_dir_path ("--run-dir", abs, false);
    free (abs);
  }
  if (o->setup.qmp)
    o->setup.qmp = absolute (o->setup.qmp);
  if (o->setup.fleecing_dir) {
    char *abs = absolute (o->setup.fleecing_dir);
    o->setup.fleecing_dir = checked_dir_path ("--fleecing-dir", abs, true);
    free (abs);
  }
  if (o->nbd_path)
    o->nbd_path = absolute (o->nbd_path);
  if (o->serve.tls_psk)         /* nbdkit changes to / */
    o->serve.tls_psk = absolute (o->serve.tls_psk);
}

/* setup, from parsed options. */
static void
do_setup (struct opts *o)
{
  struct setup_opts *s = &o->setup;
  const char *backend = s->backend, *form = NULL;

  if (s->qmp == NULL || s->ndevs == 0)
    die ("setup needs --qmp SOCKET and at least one --device");
  for (int i = 0; i < s->ndevs; i++)
    check_name ("device", s->devs[i], false);
  if (s->bitmap)
    check_name ("bitmap", s->bitmap, true);
  if (s->bitmap_mode == NULL)
    s->bitmap_mode = s->bitmap ? "use" : "none";
  if (strcmp (s->bitmap_mode, "none") != 0 &&
      strcmp (s->bitmap_mode, "new") != 0 &&
      strcmp (s->bitmap_mode, "use") != 0)
    die ("--bitmap-mode %s: expected none, new or use", s->bitmap_mode);
  if (strcmp (backend, "auto") != 0 && strcmp (backend, "proxmox") != 0 &&
      strcmp (backend, "upstream") != 0)
    die ("--backend %s: expected auto, proxmox or upstream", backend);
  if (s->target_id)
    check_name ("target id", s->target_id, true);
  if (access (run_dir, F_OK) == 0) {
    make_run_dir ();
    if (load_state ())
      die ("%s already holds a backup access: tear it down first", run_dir);
  }

  qmp_open (s->qmp);
  if (strcmp (backend, "auto") == 0)
    backend = proxmox_api_available () ? "proxmox" : "upstream";
  else if (strcmp (backend, "proxmox") == 0 && !proxmox_api_available ())
    die ("this QEMU has no Proxmox backup access API "
         "(query-proxmox-support: backup-access-api)");
  if (strcmp (backend, "upstream") == 0) {
    if (s->fleecing_dir == NULL)
      die ("upstream QEMU: --fleecing-dir DIR is needed for the fleecing "
           "images");
    if (strcmp (s->bitmap_mode, "new") == 0)
      die ("--bitmap-mode new: only with Proxmox's API; upstream, a missing "
           "--bitmap is created (a full backup)");
  }
  else if (s->target_id == NULL)
    s->target_id = s->bitmap ? s->bitmap : "backupaccess";
  if (strcmp (backend, "proxmox") == 0 && s->bitmap == NULL &&
      strcmp (s->bitmap_mode, "none") != 0)
    die ("--bitmap-mode %s needs --bitmap", s->bitmap_mode);

  /* Everything that can be checked before a change, is. */
  if (strcmp (backend, "proxmox") == 0)
    form = preflight_proxmox (s);
  else {
    struct stat st;
    for (int i = 0; i < s->ndevs; i++)
      free (resolve_device (s->devs[i]));
    if (stat (s->fleecing_dir, &st) == -1 || !S_ISDIR (st.st_mode))
      die ("--fleecing-dir %s: not a directory", s->fleecing_dir);
  }

  make_run_dir ();
  state = json_object_new_object ();
  set_str (state, "backend", backend);
  set_str (state, "qmp", s->qmp);
  set_str (state, "target-id", s->target_id);
  save_state ();
  roll_back_on_error = true;
  if (strcmp (backend, "proxmox") == 0)
    setup_proxmox (s, form);
  else
    setup_upstream (s);
  start_exports ();
}

/* serve for an export that exists already (a provider's nbd-path). */
static void
do_serve_state (struct opts *o)
{
  make_run_dir ();
  if (o->nbd_path == NULL) {
    if (!load_state ())
      die ("%s has no backup access: run 'setup', or give --nbd-path",
           run_dir);
    return;
  }
  if (o->setup.ndevs == 0)
    die ("serve --nbd-path needs at least one --device DEV[:BITMAP]");
  if (load_state ())
    die ("%s already holds a backup access: tear it down first", run_dir);
  state = json_object_new_object ();
  set_str (state, "backend", "serve");
  for (int i = 0; i < o->setup.ndevs; i++) {
    json_object *d = json_object_new_object ();
    char *dev = strdup (o->setup.devs[i]);
    char *colon = strchr (dev, ':');
    struct ba_regions none;
    uint64_t size;
    char err[1024];

    if (colon) {
      *colon = '\0';
      check_name ("bitmap", colon + 1, true);
    }
    check_name ("device", dev, false);
    /* The size, and a check that the export is there. */
    ba_regions_init (&none);
    if (ba_bitmap_fetch (NULL, o->nbd_path, dev, NULL, &none, &size,
                         err, sizeof err) == -1)
      die ("device %s: %s", dev, err);
    set_str (d, "device", dev);
    set_str (d, "export", dev);
    set_str (d, "nbd-path", o->nbd_path);
    set_str (d, "bitmap-name", colon ? colon + 1 : NULL);
    set_str (d, "bitmap-mode", colon ? "reuse" : "none");
    json_object_object_add (d, "size", json_object_new_int64 (size));
    json_object_object_add (d, "cluster-size",
                            json_object_new_int64 (ba_cbw_cluster
                                                   (o->setup.cluster)));
    json_object_array_add (devices (), d);
    free (dev);
  }
  save_state ();
}

/* What QEMU's going away during a backup means for the next one. */
static void
explain_qemu_gone (void)
{
  json_object *devs = devices ();
  bool proxmox = strcmp (get_str (state, "backend") ?: "", "proxmox") == 0;

  for (size_t i = 0; i < json_object_array_length (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    const char *dev = get_str (d, "device") ?: "?";
    const char *live = get_str (d, "live-bitmap");
    const char *frozen = get_str (d, "frozen-bitmap");

    if (proxmox)
      warn ("device %s: QEMU keeps its dirty bitmaps in memory: the next "
            "backup is a full one", dev);
    else if (live && frozen)
      warn ("device %s: if QEMU shut down cleanly, it saved the changes "
            "of this backup in bitmap '%s', and the next setup with "
            "--bitmap %s adds them back; if it was killed, bitmap '%s' is "
            "inconsistent and the next setup makes a full backup",
            dev, frozen, live, live);
    else if (live)
      warn ("device %s: this full backup did not finish: the next setup "
            "with --bitmap %s makes a full backup again", dev, live);
  }
}

static void
do_teardown (bool success)
{
  bool ok = true;

  if (access (run_dir, F_OK) == -1 && errno == ENOENT) {
    warn ("%s: nothing to tear down", run_dir);
    return;
  }
  make_run_dir ();
  {
    /* Left by a helper killed while it saved the state. */
    char *p = state_path (), *tmp = xasprintf ("%s.tmp", p);
    unlink (tmp);
    free (tmp);
    free (p);
  }
  if (!load_state ()) {
    /* The state is written before any change: there is none. */
    warn ("%s: nothing to tear down", run_dir);
    rmdir (run_dir);
    return;
  }
  stop_local ();
  if (strcmp (get_str (state, "backend") ?: "", "serve") != 0) {
    char err[1024];
    if (qmp == NULL)            /* else a roll-back: the same connection */
      qmp = ba_qmp_connect (get_str (state, "qmp"), qmp_timeout_ms (),
                            err, sizeof err);
    if (qmp == NULL) {
      /* Nothing listens: QEMU is gone, and nothing is left in it to
       * undo.  Anything else (another QMP client, a timeout): keep the
       * state, so that teardown can be run again.
       */
      if (errno != ENOENT && errno != ECONNREFUSED)
        die ("%s: nothing was torn down; try again", err);
      warn ("%s (QEMU is gone: only local state is cleaned up)", err);
      explain_qemu_gone ();
      ok = false;
    }
    else
      teardown_qemu (success);
  }
  {
    char *p = state_path ();
    json_object *devs = devices ();
    for (size_t i = 0; i < alen (devs); i++) {
      json_object *d = json_object_array_get_idx (devs, i);
      const char *f = get_str (d, "fleece-file");
      if (!ok && f)
        unlink (f);
      if (get_str (d, "status-file"))
        unlink (get_str (d, "status-file"));
      for (const char *const *ext = (const char *const[]) {
             "nbdkit.log", "nbdfuse.log", NULL }; *ext; ext++) {
        char *f = xasprintf ("%s/%s.%s", run_dir, get_str (d, "device"), *ext);
        unlink (f);
        free (f);
      }
    }
    unlink (p);
    free (p);
    p = xasprintf ("%s/qemu-img.log", run_dir);
    unlink (p);
    free (p);
    /* QEMU removes its NBD server's socket when told to stop the
     * server, not when it dies or quits.
     */
    if (!ok && get_bool (state, "nbd-server-started")) {
      p = xasprintf ("%s/qemu-nbd.sock", run_dir);
      unlink (p);
      free (p);
    }
    remove_stray_sockets ();
    if (rmdir (run_dir) == -1)
      warn ("rmdir %s: %m", run_dir);
  }
  if (!ok)
    exit (1);
}

static void
roll_back (void)
{
  fprintf (stderr, "%s: undoing what was set up\n", progname);
  do_teardown (false);
}

/* run: the child's exit status decides success. */
static volatile sig_atomic_t got_signal;
static volatile sig_atomic_t child_pid;    /* the command, while it runs */

static void
on_signal (int sig)
{
  got_signal = sig;
  if (child_pid > 0)
    kill (child_pid, sig);
}

static int
do_run (struct opts *o, char **cmd)
{
  json_object *out;
  char *json;
  pid_t pid;
  int status, rc;
  struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_RESTART };
  sigset_t stop, old;

  serve_preflight (&o->serve, o->setup.ndevs, NULL, NULL, NULL);
  if (o->mount && o->serve.tls_psk)
    die ("--mount: nbdfuse cannot use TLS (libnbd 1.14 takes no PSK file "
         "from its URI): give no --tls-psk to mount");
  /* From here on: a signal during setup or serve must end in a
   * teardown with failure too, not kill the helper half-way.
   */
  sigaction (SIGINT, &sa, NULL);
  sigaction (SIGTERM, &sa, NULL);
  if (o->setup.qmp)
    do_setup (o);
  else
    do_serve_state (o);
  roll_back_on_error = true;
  serve_devices (&o->serve);
  out = describe ();
  if (o->mount)
    mount_devices (out);
  json = strdup (json_object_to_json_string_ext (out, JSON_C_TO_STRING_PLAIN));
  setenv ("BACKUPACCESS_JSON", json, 1);
  setenv ("BACKUPACCESS_RUN_DIR", run_dir, 1);
  {
    json_object *devs = devices ();
    for (size_t i = 0; i < alen (devs); i++) {
      char *k = xasprintf ("BACKUPACCESS_URI_%zu", i);
      setenv (k, get_str (json_object_array_get_idx (devs, i), "uri"), 1);
      free (k);
    }
  }
  json_object_put (out);
  free (json);
  roll_back_on_error = false;

  /* Blocked until child_pid is set, and in the child until its
   * handlers are the default ones: a signal in between, or one that
   * came before, still ends the command.
   */
  sigemptyset (&stop);
  sigaddset (&stop, SIGINT);
  sigaddset (&stop, SIGTERM);
  sigprocmask (SIG_BLOCK, &stop, &old);
  {
    pid_t parent = getpid ();
    pid = fork ();
    if (pid == -1)
      die ("fork: %m");
    if (pid == 0) {
      signal (SIGINT, SIG_DFL);
      signal (SIGTERM, SIG_DFL);
      umask (caller_umask);
      /* The backup lives as long as we do: a helper killed (SIGKILL,
       * no teardown) ends the command too.
       */
      prctl (PR_SET_PDEATHSIG, SIGTERM);
      if (getppid () != parent)
        _exit (128 + SIGTERM);
      sigprocmask (SIG_SETMASK, &old, NULL);
      execvp (cmd[0], cmd);
      fprintf (stderr, "%s: cannot run %s: %m\n", progname, cmd[0]);
      _exit (127);
    }
  }
  child_pid = pid;
  if (got_signal)
    kill (pid, got_signal);
  sigprocmask (SIG_SETMASK, &old, NULL);
  while (waitpid (pid, &status, 0) == -1)
    if (errno != EINTR)
      die ("waitpid: %m");
  child_pid = 0;                /* reaped: its pid may be reused */
  rc = WIFEXITED (status) ? WEXITSTATUS (status) : 128 + WTERMSIG (status);
  if (got_signal && rc == 0)
    rc = 128 + got_signal;
  warn ("%s exited with %d: tearing down with %s", cmd[0], rc,
        rc == 0 ? "success" : "failure");
  if (qmp) {
    ba_qmp_close (qmp);
    qmp = NULL;
  }
  do_teardown (rc == 0);
  return rc;
}

int
main (int argc, char **argv)
{
  struct opts o;
  const char *cmd;
  json_object *out;
  int rc = 0;

  /* Everything made here and by the children (state, logs, pidfiles,
   * nbdkit's sockets, the filter's status files, fleecing images) is
   * the caller's alone, whatever umask the caller has.
   */
  caller_umask = umask (077);
  if (argc < 2)
    usage (stderr, 2);
  cmd = argv[1];
  if (strcmp (cmd, "--help") == 0 || strcmp (cmd, "-h") == 0)
    usage (stdout, 0);
  argv++;
  argc--;

  if (strcmp (cmd, "setup") == 0) {
    parse_options (argc, argv, &o, SETUP_USAGE);
    do_setup (&o);
    roll_back_on_error = false;
    out = describe ();
    print_json (out);
    json_object_put (out);
  }
  else if (strcmp (cmd, "serve") == 0) {
    parse_options (argc, argv, &o, SERVE_USAGE);
    serve_preflight (&o.serve, o.setup.ndevs, NULL, NULL, NULL);
    do_serve_state (&o);
    serve_devices (&o.serve);
    out = describe ();
    print_json (out);
    json_object_put (out);
  }
  else if (strcmp (cmd, "mount") == 0) {
    parse_options (argc, argv, &o, MOUNT_USAGE);
    make_run_dir ();
    if (!load_state ())
      die ("%s has no backup access", run_dir);
    out = json_object_new_object ();
    mount_devices (out);
    print_json (out);
    json_object_put (out);
  }
  else if (strcmp (cmd, "status") == 0) {
    parse_options (argc, argv, &o, STATUS_USAGE);
    make_run_dir ();
    if (!load_state ())
      die ("%s has no backup access", run_dir);
    status_command ();
  }
  else if (strcmp (cmd, "teardown") == 0) {
    parse_options (argc, argv, &o, TEARDOWN_USAGE);
    if (o.success == -1)
      die ("teardown needs --success or --failure");
    do_teardown (o.success);
  }
  else if (strcmp (cmd, "run") == 0) {
    parse_options (argc, argv, &o, RUN_USAGE);
    if (optind >= argc)
      die ("run needs -- COMMAND [ARGS...]");
    rc = do_run (&o, argv + optind);
  }
  else {
    fprintf (stderr, "%s: unknown command '%s'\n", progname, cmd);
    usage (stderr, 2);
  }
  free (o.setup.devs);
  free ((char *) o.nbd_path);
  free ((char *) o.setup.qmp);
  free ((char *) o.setup.fleecing_dir);
  free ((char *) o.serve.tls_psk);
  free (run_dir);
  json_object_put (state);
  return rc;
}
