/* SPDX-License-Identifier: BSD-3-Clause */
/* A small QMP client: one command at a time, replies bounded in size
 * and in time, events skipped.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "qmp.h"

struct ba_qmp {
  int fd;
  int timeout_ms;
  char *buf;                    /* bytes received, not yet parsed */
  size_t len, cap;
};

int
ba_qmp_parse_reply (const char *line, size_t len, json_object **result,
                    char *errbuf, size_t errlen)
{
  json_tokener *tok = json_tokener_new ();
  json_object *obj, *v;
  int r = -1;

  *result = NULL;
  if (tok == NULL) {
    snprintf (errbuf, errlen, "out of memory");
    return -1;
  }
  obj = json_tokener_parse_ex (tok, line, (int) len);
  if (obj == NULL || json_tokener_get_error (tok) != json_tokener_success ||
      !json_object_is_type (obj, json_type_object)) {
    snprintf (errbuf, errlen, "malformed QMP output");
    goto out;
  }
  if (json_object_object_get_ex (obj, "return", &v)) {
    /* json-c's null is NULL, which would read as an error. */
    if (v == NULL)
      snprintf (errbuf, errlen, "QMP reply with a null return value");
    else {
      *result = json_object_get (v);
      r = 1;
    }
  }
  else if (json_object_object_get_ex (obj, "error", &v)) {
    json_object *desc;
    const char *text = NULL;
    if (json_object_object_get_ex (v, "desc", &desc) &&
        json_object_is_type (desc, json_type_string))
      text = json_object_get_string (desc);
    snprintf (errbuf, errlen, "%s",
              text && text[0] ? text : "unknown QMP error");
    r = 1;
  }
  else if (json_object_object_get_ex (obj, "event", &v) ||
           json_object_object_get_ex (obj, "QMP", &v))
    r = 0;
  else
    snprintf (errbuf, errlen, "unexpected QMP output");
 out:
  json_object_put (obj);
  json_tokener_free (tok);
  return r;
}

static long
ms_left (const struct timespec *deadline)
{
  struct timespec now;
  clock_gettime (CLOCK_MONOTONIC, &now);
  return (deadline->tv_sec - now.tv_sec) * 1000
    + (deadline->tv_nsec - now.tv_nsec) / 1000000;
}

static void
deadline_in (struct timespec *deadline, int ms)
{
  clock_gettime (CLOCK_MONOTONIC, deadline);
  deadline->tv_sec += ms / 1000;
  deadline->tv_nsec += (ms % 1000) * 1000000L;
  if (deadline->tv_nsec >= 1000000000L) {
    deadline->tv_sec++;
    deadline->tv_nsec -= 1000000000L;
  }
}

/* Reads one line (without the newline) into a malloc'd string, by the
 * deadline: one for a whole command, so that a peer sending events (or
 * anything else) without end cannot hold us past it.
 */
static char *
read_line (struct ba_qmp *q, const struct timespec *deadline,
           char *errbuf, size_t errlen)
{
  for (;;) {
    char *nl = q->len ? memchr (q->buf, '\n', q->len) : NULL;
    struct pollfd pfd = { .fd = q->fd, .events = POLLIN };
    long left;
    ssize_t n;

    if (nl) {
      size_t linelen = nl - q->buf;
      char *line = strndup (q->buf, linelen);
      memmove (q->buf, nl + 1, q->len - linelen - 1);
      q->len -= linelen + 1;
      if (line == NULL)
        snprintf (errbuf, errlen, "out of memory");
      return line;
    }
    if (q->len >= BA_QMP_MAX_LINE) {
      snprintf (errbuf, errlen, "QMP reply longer than %zu bytes",
                BA_QMP_MAX_LINE);
      return NULL;
    }
    if (q->len == q->cap) {
      size_t cap = q->cap ? q->cap * 2 : 65536;
      char *b = realloc (q->buf, cap);
      if (b == NULL) {
        snprintf (errbuf, errlen, "out of memory");
        return NULL;
      }
      q->buf = b;
      q->cap = cap;
    }
    left = ms_left (deadline);
    if (left > 0) {
      int r = poll (&pfd, 1, (int) left);
      if (r == -1 && errno == EINTR)
        continue;               /* the deadline still holds */
      if (r == 0)
        left = 0;
    }
    if (left <= 0) {
      snprintf (errbuf, errlen, "QEMU did not answer within %d s",
                q->timeout_ms / 1000);
      return NULL;
    }
    n = read (q->fd, q->buf + q->len, q->cap - q->len);
    if (n == 0) {
      snprintf (errbuf, errlen, "QMP connection closed by QEMU");
      return NULL;
    }
    if (n < 0) {
      if (errno == EINTR)
        continue;
      snprintf (errbuf, errlen, "reading QMP: %s", strerror (errno));
      return NULL;
    }
    q->len += n;
  }
}

static int
send_all (int fd, const char *s, size_t len)
{
  while (len > 0) {
    ssize_t n = send (fd, s, len, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    s += n;
    len -= n;
  }
  return 0;
}

json_object *
ba_qmp_cmd (struct ba_qmp *q, const char *command, json_object *args,
            int *qemu_error, char *errbuf, size_t errlen)
{
  json_object *msg = json_object_new_object ();
  const char *text;
  int dummy;
  struct timespec deadline;

  if (qemu_error == NULL)
    qemu_error = &dummy;
  *qemu_error = 0;
  json_object_object_add (msg, "execute", json_object_new_string (command));
  if (args)
    json_object_object_add (msg, "arguments", json_object_get (args));
  text = json_object_to_json_string_ext (msg, JSON_C_TO_STRING_PLAIN);
  if (send_all (q->fd, text, strlen (text)) == -1 ||
      send_all (q->fd, "\n", 1) == -1) {
    snprintf (errbuf, errlen, "%s: sending to QMP: %s", command,
              strerror (errno));
    json_object_put (msg);
    return NULL;
  }
  json_object_put (msg);
  deadline_in (&deadline, q->timeout_ms);
  for (;;) {
    json_object *result;
    char *line = read_line (q, &deadline, errbuf, errlen);
    int r;

    if (line == NULL)
      return NULL;
    r = ba_qmp_parse_reply (line, strlen (line), &result, errbuf, errlen);
    free (line);
    if (r == 0)
      continue;                 /* an event */
    if (r == -1)
      return NULL;
    if (result == NULL)
      *qemu_error = 1;
    return result;
  }
}

struct ba_qmp *
ba_qmp_connect (const char *path, int timeout_ms, char *errbuf, size_t errlen)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  struct ba_qmp *q;
  json_object *r;
  char *greeting;
  struct timespec deadline;

  if (strlen (path) >= sizeof addr.sun_path) {
    snprintf (errbuf, errlen, "%s: socket path too long", path);
    return NULL;
  }
  memcpy (addr.sun_path, path, strlen (path) + 1);
  q = calloc (1, sizeof *q);
  if (q == NULL) {
    snprintf (errbuf, errlen, "out of memory");
    return NULL;
  }
  q->timeout_ms = timeout_ms;
  q->fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (q->fd == -1 ||
      connect (q->fd, (struct sockaddr *) &addr, sizeof addr) == -1) {
    int e = errno;
    snprintf (errbuf, errlen, "cannot connect to QMP socket %s: %s",
              path, strerror (e));
    ba_qmp_close (q);
    errno = e;
    return NULL;
  }
  /* QEMU greets a client at once, unless another one is connected. */
  deadline_in (&deadline, timeout_ms < 10000 ? timeout_ms : 10000);
  greeting = read_line (q, &deadline, errbuf, errlen);
  if (greeting == NULL || strstr (greeting, "\"QMP\"") == NULL) {
    if (greeting)
      snprintf (errbuf, errlen, "%s: not a QMP socket", path);
    else
      snprintf (errbuf, errlen, "%s: no QMP greeting (QEMU serves one "
                "client per QMP socket at a time: is another one "
                "connected?)", path);
    free (greeting);
    ba_qmp_close (q);
    errno = ETIMEDOUT;
    return NULL;
  }
  free (greeting);
  r = ba_qmp_cmd (q, "qmp_capabilities", NULL, NULL, errbuf, errlen);
  if (r == NULL) {
    ba_qmp_close (q);
    errno = EPROTO;
    return NULL;
  }
  json_object_put (r);
  return q;
}

void
ba_qmp_close (struct ba_qmp *q)
{
  if (q == NULL)
    return;
  if (q->fd >= 0)
    close (q->fd);
  free (q->buf);
  free (q);
}
