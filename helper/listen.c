/* SPDX-License-Identifier: BSD-3-Clause */
/* Where serve's nbdkit listens and who may connect: the checks of
 * --listen, --tls-psk, --insecure-no-tls (and --bandwidth-limit), made
 * before anything starts, and the URI a client reads each device at.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "listen.h"
#include "options.h"
#include "util.h"

/* A path as a URI query value: '&', '#', '%', spaces, anything not
 * plain is percent-encoded (libnbd decodes it), so that a directory's
 * name can neither break the URI nor add parameters to it.
 */
static char *
uri_escape (const char *s)
{
  char *out = malloc (strlen (s) * 3 + 1), *p = out;

  if (out == NULL)
    die ("out of memory");
  for (; *s; s++) {
    unsigned char c = *s;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
        (c >= '0' && c <= '9') || strchr ("-._~/", c))
      *p++ = c;
    else
      p += sprintf (p, "%%%02X", c);
  }
  *p = '\0';
  return out;
}

/* The user name of a PSK file ("USER:HEXKEY" lines, as psktool(1)
 * writes them), after checking that only its owner (root or the caller)
 * can read it and that its first key is long enough.
 */
static char *
psk_user (const char *path)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
  struct stat st;
  char line[1024], *colon, *user;
  FILE *fp;
  size_t i, hex;

  if (fd == -1)
    die ("--tls-psk %s: %m", path);
  if (fstat (fd, &st) == -1)
    die ("--tls-psk %s: %m", path);
  if (!S_ISREG (st.st_mode))
    die ("--tls-psk %s: not a regular file", path);
  if ((st.st_uid != 0 && st.st_uid != geteuid ()) || (st.st_mode & 077))
    die ("--tls-psk %s: must be owned by root or you and readable by its "
         "owner only (chmod 600)", path);
  fp = fdopen (fd, "r");
  if (fp == NULL)
    die ("--tls-psk %s: %m", path);
  if (fgets (line, sizeof line, fp) == NULL)
    line[0] = '\0';
  fclose (fp);
  line[strcspn (line, "\r\n")] = '\0';
  colon = strchr (line, ':');
  for (i = 0; colon && line + i < colon; i++)
    if (!((line[i] >= 'a' && line[i] <= 'z') ||
          (line[i] >= 'A' && line[i] <= 'Z') ||
          (line[i] >= '0' && line[i] <= '9') || strchr ("-._", line[i])))
      break;
  for (hex = 0; colon && colon[1 + hex] &&
         strchr ("0123456789abcdefABCDEF", colon[1 + hex]); hex++)
    ;
  if (colon == NULL || colon == line || line + i != colon ||
      colon[1 + hex] != '\0' || hex % 2 != 0 || hex < 32)
    die ("--tls-psk %s: the first line must be USER:HEXKEY (a user name of "
         "letters, digits, '-', '.', '_' and a key of at least 16 bytes), "
         "as 'psktool -u USER -p FILE' writes it", path);
  user = strndup (line, colon - line);
  if (user == NULL)
    die ("out of memory");
  return user;
}

/* HOST:PORT, [IPV6]:PORT. */
static void
parse_listen (const char *listen, char **host, int *port, int ndevs)
{
  const char *colon = strrchr (listen, ':');
  char *end;
  long p;
  size_t n;

  if (colon == NULL || colon == listen)
    die ("--listen %s: expected HOST:PORT", listen);
  errno = 0;
  p = strtol (colon + 1, &end, 10);
  if (errno || end == colon + 1 || *end || p < 1 || p + ndevs - 1 > 65535)
    die ("--listen %s: the port must be 1 to 65535, and one more per "
         "further device", listen);
  n = colon - listen;
  if (listen[0] == '[' && n > 2 && listen[n - 1] == ']')
    *host = strndup (listen + 1, n - 2);
  else
    *host = strndup (listen, n);
  if (*host == NULL)
    die ("out of memory");
  for (const char *c = *host; *c; c++)
    if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
          (*c >= '0' && *c <= '9') || strchr ("-.:", *c)))
      die ("--listen %s: not a host name or an IP address", listen);
  *port = (int) p;
}

void
serve_preflight (const struct serve_opts *so, int ndevs,
                 struct listen_addr *la)
{
  struct listen_addr l = { .host = NULL };

  if (so->listen && !so->tls_psk && !so->insecure_no_tls)
    die ("--listen %s: TCP is served with TLS only: give --tls-psk FILE "
         "(or, on a network where anyone may read the disks, "
         "--insecure-no-tls)", so->listen);
  if (so->insecure_no_tls && (!so->listen || so->tls_psk))
    die ("--insecure-no-tls goes with --listen, and without --tls-psk");
  if (so->bandwidth > INT64_MAX / 8)
    die ("--bandwidth-limit: too large");
  if (so->listen)
    parse_listen (so->listen, &l.host, &l.port, ndevs > 0 ? ndevs : 1);
  if (so->tls_psk) {
    l.user = psk_user (so->tls_psk);
    l.psk_file_esc = uri_escape (so->tls_psk);
  }
  if (la)
    *la = l;
  else
    listen_addr_free (&l);
}

void
listen_addr_free (struct listen_addr *la)
{
  free (la->host);
  free (la->user);
  free (la->psk_file_esc);
}

char *
client_uri (const struct listen_addr *la, int i, const char *sock)
{
  const char *psk_esc = la->psk_file_esc, *user = la->user;
  /* IPv6 addresses in brackets; the PSK's user before the host. */
  bool v6 = la->host && strchr (la->host, ':');
  char *esc, *uri;

  if (la->host)
    return xasprintf ("nbd%s://%s%s%s%s%s:%d/%s%s", psk_esc ? "s" : "",
                      user ? user : "", user ? "@" : "", v6 ? "[" : "",
                      la->host, v6 ? "]" : "", la->port + i,
                      psk_esc ? "?tls-psk-file=" : "", psk_esc ? psk_esc : "");
  esc = uri_escape (sock);
  uri = xasprintf ("nbd%s+unix://%s%s/?socket=%s%s%s", psk_esc ? "s" : "",
                   user ? user : "", user ? "@" : "", esc,
                   psk_esc ? "&tls-psk-file=" : "", psk_esc ? psk_esc : "");
  free (esc);
  return uri;
}
