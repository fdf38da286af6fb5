/* SPDX-License-Identifier: BSD-3-Clause */
/* Child processes, pidfiles, /proc, and stopping the helper's nbdkit
 * and nbdfuse processes.
 */
#ifndef BACKUPACCESS_HELPER_PROC_H
#define BACKUPACCESS_HELPER_PROC_H

#include <stdbool.h>
#include <sys/types.h>

pid_t spawn (char **argv, const char *log, bool background);
int run_wait (char **argv, const char *log);
pid_t spawn_detached (char **argv, const char *log, int *go);
bool process_running (pid_t pid);
pid_t read_pidfile (const char *path);
void stop_pid (pid_t pid);
char *tail_of (const char *path);
void make_private (const char *path);
bool cmdline_mentions (long pid, const char *text);
void stop_strays (void);

#endif /* BACKUPACCESS_HELPER_PROC_H */
