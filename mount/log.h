/* SPDX-License-Identifier: BSD-3-Clause */
/* backupaccess-mount's messages: on stderr in the foreground, to syslog
 * once it runs as a daemon; debug lines only with --verbose.
 */
#ifndef BACKUPACCESS_MOUNT_LOG_H
#define BACKUPACCESS_MOUNT_LOG_H

#include <stdbool.h>

#define PROGRAM_NAME "backupaccess-mount"

extern bool log_verbose;

/* Messages go to syslog from now on. */
void log_to_syslog (void);

/* "backupaccess-mount: error: ..." */
void log_error (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
/* "backupaccess-mount: ..." */
void log_info (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
/* "backupaccess-mount: debug: ...", with --verbose only. */
void log_debug (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));

#endif /* BACKUPACCESS_MOUNT_LOG_H */
