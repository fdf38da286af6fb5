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

/* QEMU's NBD server on a unix socket in the run directory, and an
 * export per device (name = device, writable only for discard).
 */
void
start_exports (void)
{
  json_object *devs = devices ();
  char *sock = xasprintf ("%s/qemu-nbd.sock", run_dir);

  set_str (state, "nbd-path", sock);
  /* Recorded first, in case we are killed right after QEMU did it; if
   * QEMU refuses (another NBD server runs), it is not ours to stop.
   */
  json_object_object_add (state, "nbd-server-started",
                          json_object_new_boolean (1));
  save_state ();
  {
    json_object *r = qmp_run (true, "nbd-server-start", obj (
      "addr", obj ("type", S ("unix"), "data", obj ("path", S (sock), END),
                   END), END));
    if (r == NULL) {
      json_object_object_add (state, "nbd-server-started", NULL);
      save_state ();
      die ("QMP nbd-server-start failed (is another NBD server running in "
           "this QEMU?)");
    }
    json_object_put (r);
  }
  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    json_object *args = obj ("type", S ("nbd"), "id", S (get_str (d, "export")),
                             "node-name", S (get_str (d, "node")),
                             "name", S (get_str (d, "export")),
                             "writable", json_object_new_boolean (1), END);
    if (get_str (d, "bitmap-name")) {
      json_object *b = json_object_new_array ();
      json_object_array_add (b, obj ("node", S (get_str (d, "bitmap-node")),
                                     "name", S (get_str (d, "bitmap-name")),
                                     END));
      json_object_object_add (args, "bitmaps", b);
    }
    json_object_object_add (d, "exported", json_object_new_boolean (1));
    save_state ();
    {
      json_object *r = qmp_run (true, "block-export-add", args);
      if (r == NULL) {
        json_object_object_add (d, "exported", NULL);
        save_state ();
        die ("QMP block-export-add for %s failed", get_str (d, "export"));
      }
      json_object_put (r);
    }
    {
      char *p = xasprintf ("%s/qemu-nbd.sock", run_dir);
      set_str (d, "nbd-path", p);
      free (p);
    }
  }
  save_state ();
  free (sock);
}
