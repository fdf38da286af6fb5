/* SPDX-License-Identifier: BSD-3-Clause */
/* The state file, DIR/state.json: what has been set up, written before
 * (or as) each step is taken, so that teardown can undo a setup that
 * stopped half-way.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json.h>

#include "rundir.h"
#include "state.h"
#include "statefile.h"
#include "util.h"

json_object *state;

char *
state_path (void)
{
  return xasprintf ("%s/state.json", run_dir);
}

void
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
bool
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

json_object *
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
