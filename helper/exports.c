/* SPDX-License-Identifier: BSD-3-Clause */
/* QEMU's NBD server on a unix socket in the run directory, and an NBD
 * export per device.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

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

/* An exported bitmap is busy: merging it back would fail (or abort
 * QEMU).  So this comes before anything else in QEMU is undone.
 */
void
stop_exports (struct helper_state *st)
{
  for (size_t i = 0; i < st->ndevices; i++) {
    struct device_state *d = &st->devices[i];
    if (d->exported) {
      json_object *r = qmp_run (true, "block-export-del",
                                obj ("id", S (d->export), END));
      json_object_put (r);
      wait_gone ("query-block-exports", "id", d->export);
      d->exported = false;
      state_save (st);
    }
  }
  if (st->nbd_server_started) {
    json_object_put (qmp_run (true, "nbd-server-stop", NULL));
    st->nbd_server_started = false;
    state_save (st);
  }
}
