/* SPDX-License-Identifier: BSD-3-Clause */
/* setup: checks everything that can be checked, records the state,
 * and sets up snapshot access through a backend, then QEMU's exports.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <json.h>

#include "backend.h"
#include "cluster.h"
#include "exports.h"
#include "options.h"
#include "qmpops.h"
#include "rundir.h"
#include "setup.h"
#include "state.h"
#include "teardown.h"
#include "util.h"

/* The options, checked before QEMU is asked anything. */
static void
check_options (struct setup_opts *s)
{
  if (s->qmp == NULL || s->ndevs == 0)
    die ("setup needs --qmp SOCKET and at least one --device");
  for (int i = 0; i < s->ndevs; i++) {
    check_name ("device", s->devs[i], false);
    for (int j = 0; j < i; j++)
      if (strcmp (s->devs[i], s->devs[j]) == 0)
        die ("--device %s is given twice", s->devs[i]);
  }
  /* setup makes the fleecing images of upstream QEMU: qcow2 ones. */
  if (s->cluster < BA_QCOW2_CLUSTER_MIN || s->cluster > BA_QCOW2_CLUSTER_MAX)
    die ("--cluster-size %" PRIi64 ": setup creates qcow2 fleecing images, "
         "whose clusters are a power of two from 512 to 2M", s->cluster);
  if (s->bitmap)
    check_name ("bitmap", s->bitmap, true);
  if (s->bitmap_mode == NULL)
    s->bitmap_mode = s->bitmap ? "use" : "none";
  if (strcmp (s->bitmap_mode, "none") != 0 &&
      strcmp (s->bitmap_mode, "new") != 0 &&
      strcmp (s->bitmap_mode, "use") != 0)
    die ("--bitmap-mode %s: expected none, new or use", s->bitmap_mode);
  if (strcmp (s->backend, "auto") != 0 &&
      strcmp (s->backend, "proxmox") != 0 &&
      strcmp (s->backend, "upstream") != 0)
    die ("--backend %s: expected auto, proxmox or upstream", s->backend);
  if (s->target_id)
    check_name ("target id", s->target_id, true);
}

struct helper_state *
do_setup (struct opts *o)
{
  struct setup_opts *s = &o->setup;
  const struct backend *be;
  struct helper_state *st;

  check_options (s);
  if (access (run_dir, F_OK) == 0) {
    make_run_dir ();
    if (state_exists ())
      die ("%s already holds a backup access: tear it down first", run_dir);
  }

  qmp_open (s->qmp);
  be = backend_for_setup (s->backend);
  /* Everything that can be checked before a change, is. */
  be->preflight (s);

  lock_run_dir ();
  if (state_exists ())          /* another helper was quicker */
    die ("%s already holds a backup access: tear it down first", run_dir);
  st = state_new (be->name);
  state_set (&st->qmp, s->qmp);
  state_set (&st->target_id, s->target_id);
  state_save (st);
  on_die (roll_back);
  be->setup (st, s);
  start_exports (st);
  return st;
}
