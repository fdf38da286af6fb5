/* SPDX-License-Identifier: BSD-3-Clause */
/* The helper's state file: see statefile.h.  Parsed as json-c's
 * json_object_from_file did before this was taken out of the helper,
 * then checked for the shape the helper relies on.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "statefile.h"

/* The helper walks "devices" with json-c calls that abort on anything
 * but an array of objects (json_object_array_length,
 * json_object_object_add): refuse any other shape here.
 */
static int
check_shape (json_object *state, char *errbuf, size_t errlen)
{
  json_object *devs;

  if (!json_object_is_type (state, json_type_object)) {
    snprintf (errbuf, errlen, "not a valid state file: not a JSON object");
    return -1;
  }
  if (!json_object_object_get_ex (state, "devices", &devs))
    return 0;
  if (!json_object_is_type (devs, json_type_array)) {
    snprintf (errbuf, errlen,
              "not a valid state file: \"devices\" is not an array");
    return -1;
  }
  for (size_t i = 0; i < json_object_array_length (devs); i++) {
    if (!json_object_is_type (json_object_array_get_idx (devs, i),
                              json_type_object)) {
      snprintf (errbuf, errlen,
                "not a valid state file: \"devices\" item %zu is not an "
                "object", i);
      return -1;
    }
  }
  return 0;
}

json_object *
ba_state_parse (const char *text, size_t len, char *errbuf, size_t errlen)
{
  json_tokener *tok;
  json_object *obj;

  if (len > BA_STATE_MAX_SIZE) {
    snprintf (errbuf, errlen, "too large to be a state file");
    return NULL;
  }
  tok = json_tokener_new ();
  if (tok == NULL) {
    snprintf (errbuf, errlen, "not a valid state file: out of memory");
    return NULL;
  }
  /* Strict: a lenient number such as 0945e would be read as one value
   * and written back as another.
   */
  json_tokener_set_flags (tok, JSON_TOKENER_STRICT);
  obj = json_tokener_parse_ex (tok, text, (int) len);
  if (obj == NULL) {
    enum json_tokener_error e = json_tokener_get_error (tok);
    snprintf (errbuf, errlen, "not a valid state file: %s",
              e == json_tokener_continue ? "it ends before its JSON value"
              : json_tokener_error_desc (e));
  }
  json_tokener_free (tok);
  if (obj != NULL && check_shape (obj, errbuf, errlen) == -1) {
    json_object_put (obj);
    obj = NULL;
  }
  return obj;
}

int
ba_state_load (const char *path, json_object **state,
               char *errbuf, size_t errlen)
{
  struct stat st;
  char *text = NULL, msg[512];
  size_t len = 0;
  int fd;

  *state = NULL;
  /* Never through a symlink: the state names files to delete. */
  fd = open (path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
  if (fd == -1 && errno == ENOENT)
    return 0;
  if (fd == -1 || fstat (fd, &st) == -1) {
    snprintf (errbuf, errlen, "%s: %s", path, strerror (errno));
    if (fd != -1)
      close (fd);
    return -1;
  }
  if (!S_ISREG (st.st_mode)) {
    snprintf (errbuf, errlen, "%s: not a regular file", path);
    close (fd);
    return -1;
  }
  if ((uint64_t) st.st_size > BA_STATE_MAX_SIZE) {
    snprintf (errbuf, errlen, "%s: too large to be a state file", path);
    close (fd);
    return -1;
  }
  /* Read to the end, however long: a file may grow after fstat. */
  for (size_t cap = 0;;) {
    ssize_t n;
    if (len == cap) {
      char *t;
      cap = cap ? cap * 2 : 4096;
      if (cap > BA_STATE_MAX_SIZE + 1)
        cap = BA_STATE_MAX_SIZE + 1;
      if (len == cap)
        break;                  /* too large: ba_state_parse says so */
      t = realloc (text, cap);
      if (t == NULL) {
        snprintf (errbuf, errlen, "%s: out of memory", path);
        free (text);
        close (fd);
        return -1;
      }
      text = t;
    }
    n = read (fd, text + len, cap - len);
    if (n == 0)
      break;
    if (n < 0) {
      if (errno == EINTR)
        continue;
      snprintf (errbuf, errlen, "%s: %s", path, strerror (errno));
      free (text);
      close (fd);
      return -1;
    }
    len += n;
  }
  close (fd);
  *state = ba_state_parse (text ? text : "", len, msg, sizeof msg);
  free (text);
  if (*state == NULL) {
    snprintf (errbuf, errlen, "%s: %s", path, msg);
    return -1;
  }
  return 1;
}
