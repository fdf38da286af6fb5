/* SPDX-License-Identifier: BSD-3-Clause */
/* What backupaccess-copy tells: the share done once a second
 * (--progress), the counters as JSON (--status FILE, once a second and
 * at the end), and at the end the summary line or why it failed.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <json.h>

#include "program.h"

const char *
source_name (const struct options *o)
{
  return o->uri ? o->uri : o->export;
}

/* The counters as JSON into --status FILE (through a temporary file):
 * complete only at the end of a copy that succeeded.
 */
static void
write_status (const struct options *o, const struct ba_copy_stats *st,
              bool incremental, bool ok, double secs)
{
  json_object *j = json_object_new_object ();
  char *tmp;

  json_object_object_add (j, "output", json_object_new_string (o->output));
  json_object_object_add (j, "kind", json_object_new_string
                          (incremental ? "incremental" : "full"));
  json_object_object_add (j, "complete", json_object_new_boolean (ok));
  json_object_object_add (j, "broken", json_object_new_boolean (st->broken));
#define ADD(key, v) \
  json_object_object_add (j, key, json_object_new_int64 ((int64_t) (v)))
  ADD ("bytes-total", st->total);
  ADD ("bytes-done", st->done);
  ADD ("bytes-left", st->total - st->done);
  ADD ("bytes-read", st->bytes_read);
  ADD ("bytes-data", st->bytes_data);
  ADD ("bytes-zeroes", st->bytes_zeroes);
  ADD ("bytes-skipped", st->bytes_skipped);
  ADD ("bytes-discarded", st->bytes_discarded);
  ADD ("bytes-discarded-clean", st->clean_discarded);
  ADD ("trims", st->trims_sent);
  ADD ("trim-errors", st->trim_errors);
#undef ADD
  json_object_object_add (j, "seconds", json_object_new_double (secs));
  if (asprintf (&tmp, "%s.tmp", o->status) == -1 ||
      json_object_to_file_ext (tmp, j, JSON_C_TO_STRING_PRETTY) == -1 ||
      rename (tmp, o->status) == -1)
    warn ("--status %s: cannot write it", o->status);
  free (tmp);
  json_object_put (j);
}

/* Once a second while the copy runs: the share done (--progress) and
 * the status file.
 */
void
report_progress (struct job *job)
{
  const struct options *o = job->o;
  struct ba_copy_stats st;

  ba_copy_get_stats (job->copy, &st);
  if (o->status)
    write_status (o, &st, job->incremental, false,
                  (now_ns () - job->t0) / 1e9);
  if (o->progress)
    fprintf (stderr, "%s: %3.0f%% (%" PRIu64 " of %" PRIu64 " MiB)%c",
             progname, st.total ? 100.0 * st.done / st.total : 100.0,
             st.done >> 20, st.total >> 20, isatty (2) ? '\r' : '\n');
}

static void
summary (const struct options *o, const struct ba_copy_stats *st,
         bool incremental, double secs)
{
  warn ("%s: %s backup of %s complete: %" PRIu64 " bytes, %" PRIu64
        " read from QEMU, %" PRIu64 " written as data, %" PRIu64
        " as zeroes, %" PRIu64 " left as holes; %" PRIu64 " bytes "
        "discarded in QEMU in %" PRIu64 " trims, %" PRIu64 " trim errors; "
        "%.2f s, %.0f MiB/s", o->output,
        incremental ? "incremental" : "full", source_name (o), st->total,
        st->bytes_read, st->bytes_data, st->bytes_zeroes, st->bytes_skipped,
        st->bytes_discarded, st->trims_sent, st->trim_errors, secs,
        secs > 0 ? st->total / secs / 1048576 : 0.0);
}

void
report_end (struct job *job, bool ok)
{
  const struct options *o = job->o;
  double secs = (now_ns () - job->t0) / 1e9;
  struct ba_copy_stats st;
  char err[1024];

  ba_copy_get_stats (job->copy, &st);
  if (o->status)
    write_status (o, &st, job->incremental, ok, secs);
  if (ok)
    summary (o, &st, job->incremental, secs);
  else {
    ba_copy_failed (job->copy, err, sizeof err);
    warn ("the backup of %s failed: %s; %s was not written", source_name (o),
          err, o->output);
  }
}
