/* SPDX-License-Identifier: BSD-3-Clause */
/* The run directory (--run-dir): where the state, sockets, pidfiles,
 * logs and mounts of one backup access are.
 */
#ifndef BACKUPACCESS_HELPER_RUNDIR_H
#define BACKUPACCESS_HELPER_RUNDIR_H

#include <stdbool.h>

/* Its real path, set by parse_options. */
extern char *run_dir;

/* The real path of a directory (or of one to be made, in an existing
 * parent); dies unless every directory above it (and with check_self
 * the directory itself) can be changed by root or the caller only.
 */
char *checked_dir_path (const char *what, const char *path, bool check_self);

/* Creates the run directory, private to the caller, or dies unless an
 * existing one is.
 */
void make_run_dir (void);

/* Whether the run directory exists (never creating it); dies if it is
 * not private to the caller.
 */
bool run_dir_exists (void);

/* Makes the run directory if need be and takes its lock, waiting
 * (with a word) while another helper holds it: one helper at a time
 * changes a backup access and its state.  Held until unlock_run_dir, or
 * the end of the process.
 */
void lock_run_dir (void);
void unlock_run_dir (void);

/* Takes the lock of the run directory without ever making it: the one
 * release_run_dir let go of, else the one there is (which must be
 * private to the caller).  True if it is held already; false if there
 * is none, or if it was removed while another helper held its lock (a
 * teardown ended that backup access, and a directory made since holds
 * another one, or none).
 */
bool lock_existing_run_dir (void);

/* Lets other helpers have the lock while this one waits (run's
 * COMMAND), keeping the directory open for lock_existing_run_dir.
 */
void release_run_dir (void);

/* Removes the sockets in the run directory. */
void remove_stray_sockets (void);

#endif /* BACKUPACCESS_HELPER_RUNDIR_H */
