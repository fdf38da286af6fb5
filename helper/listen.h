/* SPDX-License-Identifier: BSD-3-Clause */
/* Where serve's nbdkit listens, who may connect, and the URIs. */
#ifndef BACKUPACCESS_HELPER_LISTEN_H
#define BACKUPACCESS_HELPER_LISTEN_H

#include "options.h"

struct listen_addr {
  char *host;                   /* --listen's host, or NULL: unix sockets */
  int port;                     /* the first device's; +1 per device */
  char *user;                   /* the PSK file's first user, or NULL */
  char *psk_file_esc;           /* the PSK file, URI-escaped, or NULL */
};

/* Checks serve's options for ndevs devices (also before run sets
 * anything up); dies on a bad one.  Fills *la unless it is NULL.
 */
void serve_preflight (const struct serve_opts *so, int ndevs,
                      struct listen_addr *la);
void listen_addr_free (struct listen_addr *la);

/* The URI of device i's nbdkit, listening on sock (unix) or on TCP. */
char *client_uri (const struct listen_addr *la, int i, const char *sock);

#endif /* BACKUPACCESS_HELPER_LISTEN_H */
