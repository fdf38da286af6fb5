/* SPDX-License-Identifier: BSD-3-Clause */
/* Which backend: see backend.h. */
#include <stddef.h>
#include <string.h>

#include "backend.h"
#include "util.h"

const struct backend *
backend_for_setup (const char *requested)
{
  if (strcmp (requested, "auto") == 0)
    return backend_proxmox.available () ? &backend_proxmox
      : &backend_upstream;
  if (strcmp (requested, "proxmox") == 0) {
    if (!backend_proxmox.available ())
      die ("this QEMU has no Proxmox backup access API "
           "(query-proxmox-support: backup-access-api)");
    return &backend_proxmox;
  }
  return &backend_upstream;
}

const struct backend *
backend_named (const char *name)
{
  if (name && strcmp (name, backend_proxmox.name) == 0)
    return &backend_proxmox;
  if (name && strcmp (name, backend_upstream.name) == 0)
    return &backend_upstream;
  return NULL;
}

const struct backend *
backend_of_state (const struct helper_state *st)
{
  if (strcmp (st->backend ?: "", "serve") == 0)
    return NULL;
  return backend_named (st->backend) ?: &backend_upstream;
}
