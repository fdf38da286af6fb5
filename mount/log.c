/* SPDX-License-Identifier: BSD-3-Clause */
/* backupaccess-mount's messages (log.h).  One line per message, written
 * whole, so that lines of several threads never mix.
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <syslog.h>

#include "log.h"

bool log_verbose;
static bool use_syslog;

void
log_to_syslog (void)
{
  openlog (PROGRAM_NAME, LOG_PID, LOG_DAEMON);
  use_syslog = true;
}

static void
vlog (int priority, const char *prefix, const char *fmt, va_list ap)
{
  char msg[1024];

  vsnprintf (msg, sizeof msg, fmt, ap);
  if (use_syslog)
    syslog (priority, "%s%s", prefix, msg);
  else
    fprintf (stderr, PROGRAM_NAME ": %s%s\n", prefix, msg);
}

void
log_error (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vlog (LOG_ERR, "error: ", fmt, ap);
  va_end (ap);
}

void
log_info (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vlog (LOG_INFO, "", fmt, ap);
  va_end (ap);
}

void
log_debug (const char *fmt, ...)
{
  va_list ap;

  if (!log_verbose)
    return;
  va_start (ap, fmt);
  vlog (LOG_DEBUG, "debug: ", fmt, ap);
  va_end (ap);
}
