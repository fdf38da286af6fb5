/* SPDX-License-Identifier: BSD-3-Clause */
/* QEMU's NBD server on a unix socket in the run directory, and an NBD
 * export per device.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json.h>

#include "exports.h"
#include "qmpops.h"
#include "rundir.h"
#include "state.h"
#include "util.h"

/* The exports are writable only for discard. */
void
start_exports (struct helper_state *st)
{
  char *sock = xasprintf ("%s/qemu-nbd.sock", run_dir);

  state_set (&st->nbd_path, sock);
  /* Recorded first, in case we are killed right after QEMU did it; if
   * QEMU refuses (another NBD server runs), it is not ours to stop.
   */
  st->nbd_server_started = true;
  state_save (st);
  {
    json_object *r = qmp_run (true, "nbd-server-start", obj (
      "addr", obj ("type", S ("unix"), "data", obj ("path", S (sock), END),
                   END), END));
    if (r == NULL) {
      st->nbd_server_started = false;
      state_save (st);
      die ("QMP nbd-server-start failed (is another NBD server running in "
           "this QEMU?)");
    }
    json_object_put (r);
  }
  for (size_t i = 0; i < st->ndevices; i++) {
    struct device_state *d = &st->devices[i];
    json_object *args = obj ("type", S ("nbd"), "id", S (d->export),
                             "node-name", S (d->node),
                             "name", S (d->export),
                             "writable", json_object_new_boolean (1), END);
    if (d->bitmap_name) {
      json_object *b = json_object_new_array ();
      json_object_array_add (b, obj ("node", S (d->bitmap_node),
                                     "name", S (d->bitmap_name),
                                     END));
      json_object_object_add (args, "bitmaps", b);
    }
    d->exported = true;
    state_save (st);
    {
      json_object *r = qmp_run (true, "block-export-add", args);
      if (r == NULL) {
        d->exported = false;
        state_save (st);
        die ("QMP block-export-add for %s failed", d->export);
      }
      json_object_put (r);
    }
    state_set (&d->nbd_path, sock);
  }
  state_save (st);
  free (sock);
}

/* An export of one of our snapshot-access nodes: recorded, or added by
 * someone else (it keeps the bitmap busy all the same).
 */
static bool
ours (const struct helper_state *st, json_object *export)
{
  const char *node = get_str (export, "node-name");

  for (size_t i = 0; node && i < st->ndevices; i++)
    if (st->devices[i].node && strcmp (node, st->devices[i].node) == 0)
      return true;
  return false;
}

/* An exported bitmap is busy: ending the backup access then aborts
 * QEMU (Proxmox), merging it back fails.  So this comes before anything
 * else in QEMU is undone, and removes every export of our nodes with
 * mode "hard": QEMU refuses to remove one with a client still connected
 * otherwise.  Stopping our NBD server removes whatever else it serves.
 */
void
stop_exports (struct helper_state *st)
{
  json_object *list = qmp_list ("query-block-exports", NULL);

  for (size_t i = 0; i < alen (list); i++) {
    json_object *e = json_object_array_get_idx (list, i);
    const char *id = get_str (e, "id");
    if (id == NULL || !ours (st, e))
      continue;
    json_object_put (qmp_run (true, "block-export-del",
                              obj ("id", S (id), "mode", S ("hard"), END)));
    wait_gone ("query-block-exports", "id", id);
  }
  json_object_put (list);
  for (size_t i = 0; i < st->ndevices; i++)
    if (st->devices[i].exported) {
      st->devices[i].exported = false;
      state_save (st);
    }
  if (st->nbd_server_started) {
    json_object_put (qmp_run (true, "nbd-server-stop", NULL));
    st->nbd_server_started = false;
    state_save (st);
  }
}
