/* SPDX-License-Identifier: BSD-3-Clause */
/* A backend sets up snapshot access to a running QEMU's disks and
 * undoes it: Proxmox VE's backup access API (backend-proxmox.c), or
 * upstream QEMU's own commands (backend-upstream.c).  setup picks one
 * and records its name in the state; the later commands find it there.
 * serve --nbd-path has none: the exports it serves are not ours.
 */
#ifndef BACKUPACCESS_HELPER_BACKEND_H
#define BACKUPACCESS_HELPER_BACKEND_H

#include <stdbool.h>

#include "options.h"
#include "state.h"

struct backend {
  const char *name;             /* "backend" in the state file */

  /* Whether this QEMU offers it (QMP is open). */
  bool (*available) (void);

  /* Checks what can be checked before anything is changed: the options
   * this backend needs (it may fill in defaults), and QEMU's nodes.
   * Dies if setup cannot work.
   */
  void (*preflight) (struct setup_opts *o);

  /* Sets up snapshot access to o's devices and adds them to st, each
   * step recorded (state_save) before it is taken, or as it is.
   */
  void (*setup) (struct helper_state *st, const struct setup_opts *o);

  /* Undoes in QEMU what st records, once the exports are gone: with
   * success, the bitmap may forget the changes this backup holds;
   * without, it must keep every one.  Each step recorded as it is done.
   */
  void (*teardown) (struct helper_state *st, bool success);

  /* When QEMU went away during the backup: tells, per device, what the
   * next backup will be.
   */
  void (*explain_qemu_gone) (const struct helper_state *st);

  /* Its copy-before-write copies clean clusters too: the filter is to
   * discard them at start-up (backupaccess-discard-clean), except for a
   * device whose state says cbw-bitmap.
   */
  bool discard_clean;
};

extern const struct backend backend_proxmox;
extern const struct backend backend_upstream;

/* The backend for setup's --backend (auto, proxmox, upstream; checked
 * already), QMP open: auto is Proxmox's where QEMU has its API.  Dies if
 * Proxmox's is asked for and QEMU lacks it.
 */
const struct backend *backend_for_setup (const char *requested);

/* The backend of this name, or NULL. */
const struct backend *backend_named (const char *name);

/* What undoes st in QEMU: NULL for serve --nbd-path; a state of another
 * backend name is undone the upstream way, by what it names.
 */
const struct backend *backend_of_state (const struct helper_state *st);

#endif /* BACKUPACCESS_HELPER_BACKEND_H */
