/* SPDX-License-Identifier: BSD-3-Clause */
/* setup: checks everything that can be checked, records the state,
 * and sets up snapshot access through a backend, then QEMU's exports.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <json.h>

#include "backend.h"
#include "exports.h"
#include "options.h"
#include "qmpops.h"
#include "rundir.h"
#include "setup.h"
#include "state.h"
#include "teardown.h"
#include "util.h"

/* setup, from parsed options; returns the state. */
struct helper_state *
do_setup (struct opts *o)
{
  struct setup_opts *s = &o->setup;
  const char *backend = s->backend, *form = NULL;
  struct helper_state *st;

  if (s->qmp == NULL || s->ndevs == 0)
    die ("setup needs --qmp SOCKET and at least one --device");
  for (int i = 0; i < s->ndevs; i++)
    check_name ("device", s->devs[i], false);
  if (s->bitmap)
    check_name ("bitmap", s->bitmap, true);
  if (s->bitmap_mode == NULL)
    s->bitmap_mode = s->bitmap ? "use" : "none";
  if (strcmp (s->bitmap_mode, "none") != 0 &&
      strcmp (s->bitmap_mode, "new") != 0 &&
      strcmp (s->bitmap_mode, "use") != 0)
    die ("--bitmap-mode %s: expected none, new or use", s->bitmap_mode);
  if (strcmp (backend, "auto") != 0 && strcmp (backend, "proxmox") != 0 &&
      strcmp (backend, "upstream") != 0)
    die ("--backend %s: expected auto, proxmox or upstream", backend);
  if (s->target_id)
    check_name ("target id", s->target_id, true);
  if (access (run_dir, F_OK) == 0) {
    make_run_dir ();
    if (state_exists ())
      die ("%s already holds a backup access: tear it down first", run_dir);
  }

  qmp_open (s->qmp);
  if (strcmp (backend, "auto") == 0)
    backend = proxmox_api_available () ? "proxmox" : "upstream";
  else if (strcmp (backend, "proxmox") == 0 && !proxmox_api_available ())
    die ("this QEMU has no Proxmox backup access API "
         "(query-proxmox-support: backup-access-api)");
  if (strcmp (backend, "upstream") == 0) {
    if (s->fleecing_dir == NULL)
      die ("upstream QEMU: --fleecing-dir DIR is needed for the fleecing "
           "images");
    if (strcmp (s->bitmap_mode, "new") == 0)
      die ("--bitmap-mode new: only with Proxmox's API; upstream, a missing "
           "--bitmap is created (a full backup)");
  }
  else if (s->target_id == NULL)
    s->target_id = s->bitmap ? s->bitmap : "backupaccess";
  if (strcmp (backend, "proxmox") == 0 && s->bitmap == NULL &&
      strcmp (s->bitmap_mode, "none") != 0)
    die ("--bitmap-mode %s needs --bitmap", s->bitmap_mode);

  /* Everything that can be checked before a change, is. */
  if (strcmp (backend, "proxmox") == 0)
    form = preflight_proxmox (s);
  else {
    struct stat sb;
    for (int i = 0; i < s->ndevs; i++)
      free (resolve_device (s->devs[i]));
    if (stat (s->fleecing_dir, &sb) == -1 || !S_ISDIR (sb.st_mode))
      die ("--fleecing-dir %s: not a directory", s->fleecing_dir);
  }

  make_run_dir ();
  st = state_new (backend);
  state_set (&st->qmp, s->qmp);
  state_set (&st->target_id, s->target_id);
  state_save (st);
  on_die (roll_back);
  if (strcmp (backend, "proxmox") == 0)
    setup_proxmox (st, s, form);
  else
    setup_upstream (st, s);
  start_exports (st);
  return st;
}
