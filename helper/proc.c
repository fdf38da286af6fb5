/* SPDX-License-Identifier: BSD-3-Clause */
/* Child processes (an argv, never a shell): running one, starting one
 * that outlives the helper, and finding, checking and stopping the
 * nbdkit and backupaccess-mount processes the helper started, through
 * /proc; what their logs say.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <json.h>

#include "proc.h"
#include "rundir.h"
#include "util.h"

pid_t
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

int
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
pid_t
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

/* Whether a process exists and is not a zombie: a daemon that died
 * stays one until its parent (often init) reaps it.
 */
bool
process_running (pid_t pid)
{
  char buf[512];
  const char *paren;

  if (read_proc (pid, "stat", buf, sizeof buf) == -1)
    return false;
  paren = strrchr (buf, ')');
  return paren && paren[1] == ' ' && paren[2] != 'Z' && paren[2] != 'X';
}

/* The programs the helper starts, and stops. */
static const char *const our_programs[] = { "nbdkit", "backupaccess-mount" };

/* A process's comm: its name cut at 15 characters. */
#define COMM_MAX 15

/* Whether name is one of them; with comm, whether it begins with one
 * cut as comm cuts it (comm also ends in a newline).
 */
static bool
is_our_program (const char *name, bool comm)
{
  for (size_t i = 0; i < sizeof our_programs / sizeof our_programs[0]; i++) {
    size_t n = strlen (our_programs[i]);
    if (comm ? strncmp (name, our_programs[i], n < COMM_MAX ? n : COMM_MAX)
        == 0 : strcmp (name, our_programs[i]) == 0)
      return true;
  }
  return false;
}

/* Whether a process is one of ours (nbdkit or backupaccess-mount),
 * running.
 */
static bool
our_program (long pid)
{
  char comm[64];

  if (pid <= 1 || read_proc (pid, "comm", comm, sizeof comm) == -1)
    return false;
  if (!is_our_program (comm, true))
    return false;
  return process_running ((pid_t) pid);
}

/* The pid in a pidfile, if that process is still the nbdkit or
 * backupaccess-mount we started with that pidfile, and not a zombie: a
 * pid may have been reused since, even by another nbdkit, which is not
 * ours to stop.
 */
pid_t
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
  /* argv[0] is nbdkit or backupaccess-mount, and the pidfile is one
   * of its arguments (--pidfile PATH).
   */
  {
    const char *base = strrchr (cmdline, '/') ? strrchr (cmdline, '/') + 1
      : cmdline;
    if (!is_our_program (base, false))
      return 0;
  }
  for (size_t i = strlen (cmdline) + 1; i < n; i += strlen (cmdline + i) + 1)
    if (strcmp (cmdline + i, path) == 0)
      ours = true;
  return ours && process_running ((pid_t) pid) ? (pid_t) pid : 0;
}

/* Sends SIGTERM, waits, then SIGKILL. */
void
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

char *
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

void
report_log (const char *dev, const char *program, const char *log)
{
  FILE *fp = fopen (log, "r");
  char line[1024], last[3][1024];
  unsigned errors = 0;

  if (fp == NULL)
    return;
  while (fgets (line, sizeof line, fp)) {
    line[strcspn (line, "\n")] = '\0';
    if (strstr (line, ": summary: "))
      warn ("device %s: %s", dev, line);
    else if (strstr (line, " error: ")) {
      snprintf (last[errors % 3], sizeof last[0], "%s", line);
      errors++;
    }
  }
  fclose (fp);
  if (errors)
    warn ("device %s: %s logged %u error(s), the last:", dev, program,
          errors);
  for (unsigned i = errors > 3 ? errors - 3 : 0; i < errors; i++)
    warn ("  %s", last[i % 3]);
}

/* nbdkit sets its umask to 022: close what it made in the run
 * directory to everyone but us (the directory's 0700 already did; this
 * keeps it so if it is ever opened).
 */
void
make_private (const char *path)
{
  struct stat st;

  if (lstat (path, &st) == 0 && !S_ISLNK (st.st_mode) &&
      (st.st_mode & 077) != 0 && chmod (path, st.st_mode & 0700) == -1)
    die ("chmod %s: %m", path);
}

/* Whether the command line of a process has an argument containing
 * text.
 */
bool
cmdline_mentions (long pid, const char *text)
{
  static char buf[65536];
  ssize_t n = read_proc (pid, "cmdline", buf, sizeof buf);

  for (ssize_t i = 0; i < n; i += (ssize_t) strlen (buf + i) + 1)
    if (strstr (buf + i, text))
      return true;
  return false;
}

/* What a helper killed while it started nbdkit or the mount may have left
 * without a record: such processes with an argument in the run
 * directory (private to us, so they are ours), and mounts in it.
 */
void
stop_stray_processes (void)
{
  char *prefix = xasprintf ("%s/", run_dir);
  DIR *dir = opendir ("/proc");
  struct dirent *e;

  while (dir && (e = readdir (dir)) != NULL) {
    long pid = strtol (e->d_name, NULL, 10);
    if (our_program (pid) && cmdline_mentions (pid, prefix)) {
      warn ("stopping %ld, left by a helper that was killed", pid);
      stop_pid ((pid_t) pid);
    }
  }
  if (dir)
    closedir (dir);
  free (prefix);
}
