/* SPDX-License-Identifier: BSD-3-Clause */
/* Child processes (an argv, never a shell), pidfiles, /proc, and
 * stopping the nbdkit and backupaccess-mount processes the helper
 * started.
 */
#ifndef BACKUPACCESS_HELPER_PROC_H
#define BACKUPACCESS_HELPER_PROC_H

#include <stdbool.h>
#include <sys/types.h>

/* Starts argv with stdin from /dev/null and its output appended to log
 * (NULL: /dev/null).  background: in a session of its own; else it dies
 * with the helper.
 */
pid_t spawn (char **argv, const char *log, bool background);

/* spawn, in the foreground, and waits: the exit status (128 + signal). */
int run_wait (char **argv, const char *log);

/* Starts a program that outlives the helper, logging to log, and
 * returns its pid; it runs once told to on *go (write a byte, close
 * it): record the pid first.
 */
pid_t spawn_detached (char **argv, const char *log, int *go);

/* Whether a process exists and is not a zombie. */
bool process_running (pid_t pid);

/* The pid in a pidfile if that process is still the nbdkit or
 * backupaccess-mount started with that pidfile, running; else 0.
 */
pid_t read_pidfile (const char *path);

/* SIGTERM, up to WAIT_SECONDS for it to end, then SIGKILL. */
void stop_pid (pid_t pid);

/* The last 2 KiB of a file, for a message (a static buffer). */
char *tail_of (const char *path);

/* What the log of a program we started says, before teardown removes
 * it: its summary line, and the last errors it logged.
 */
void report_log (const char *dev, const char *program, const char *log);

/* Takes away group's and others' access to a file. */
void make_private (const char *path);

/* Whether an argument of a process contains text. */
bool cmdline_mentions (long pid, const char *text);

/* Stops the nbdkit and backupaccess-mount processes with an argument
 * in the run directory: left by a helper killed while it started them.
 */
void stop_stray_processes (void);

#endif /* BACKUPACCESS_HELPER_PROC_H */
