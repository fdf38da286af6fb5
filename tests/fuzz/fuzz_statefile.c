/* SPDX-License-Identifier: BSD-3-Clause */
/* Fuzzes the reader of the helper's state file, ba_state_parse
 * (lib/statefile.c).
 *
 * Properties: it accepts what json-c's json_object_from_fd accepted as
 * a state (the helper's reader before it moved into the library), with
 * the same content, except what does not have the shape the helper
 * needs (an object; "devices", if any, an array of objects), and
 * refuses the rest with a message; a state it accepts can be walked the
 * way helper/state.c reads it into its typed record (every item of
 * "devices" an object, its members read with their types checked) and,
 * written back with json-c as the helper writes it, reads back the same.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "statefile.h"
#include "fuzz.h"

/* What json-c's strict parser makes of the same bytes, as JSON alone
 * (the state file is read strictly: a lenient number such as 0945e
 * would be read as one value and written back as another).
 */
static json_object *
old_reader (const uint8_t *data, size_t size)
{
  json_tokener *tok = json_tokener_new ();
  json_object *o;

  CHECK (tok != NULL);
  json_tokener_set_flags (tok, JSON_TOKENER_STRICT);
  o = json_tokener_parse_ex (tok, (const char *) data, (int) size);
  json_tokener_free (tok);
  return o;
}

/* The shape the helper needs, checked here on its own. */
static bool
has_shape (json_object *o)
{
  json_object *devs;

  if (!json_object_is_type (o, json_type_object))
    return false;
  if (!json_object_object_get_ex (o, "devices", &devs))
    return true;
  if (!json_object_is_type (devs, json_type_array))
    return false;
  for (size_t i = 0; i < json_object_array_length (devs); i++)
    if (!json_object_is_type (json_object_array_get_idx (devs, i),
                              json_type_object))
      return false;
  return true;
}

/* Does with a state what helper/state.c does: the loop over "devices"
 * (an empty list when there is none), members read only when they have
 * the type read, and a member cleared.
 */
static void
use_like_the_helper (json_object *state)
{
  json_object *devs, *v;

  if (!json_object_object_get_ex (state, "devices", &devs)) {
    devs = json_object_new_array ();
    json_object_object_add (state, "devices", devs);
  }
  for (size_t i = 0; i < json_object_array_length (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    if (json_object_object_get_ex (d, "device", &v) &&
        json_object_is_type (v, json_type_string))
      (void) json_object_get_string (v);
    if (json_object_object_get_ex (d, "size", &v) &&
        json_object_is_type (v, json_type_int))
      (void) json_object_get_int64 (v);
    if (json_object_object_get_ex (d, "exported", &v))
      (void) json_object_get_boolean (v);
    json_object_object_add (d, "job", NULL);
  }
}

static const char *
text_of (json_object *o)
{
  return json_object_to_json_string_ext (o, JSON_C_TO_STRING_PRETTY);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  char err[512];
  json_object *state, *old, *again;

  err[0] = '\0';
  state = ba_state_parse ((const char *) data, size, err, sizeof err);
  old = old_reader (data, size);
  if (state == NULL) {
    CHECK (memchr (err, '\0', sizeof err) != NULL);
    CHECK (strncmp (err, "not a valid state file: ", 24) == 0);
    CHECK (old == NULL || !has_shape (old));
    CHECK (err[24] != '\0');
    json_object_put (old);
    return 0;
  }
  CHECK (json_object_is_type (state, json_type_object));
  CHECK (old != NULL);
  CHECK (strcmp (text_of (state), text_of (old)) == 0);
  json_object_put (old);

  use_like_the_helper (state);

  /* Saved, then loaded. */
  {
    char *saved = strdup (text_of (state));
    CHECK (saved != NULL);
    again = ba_state_parse (saved, strlen (saved), err, sizeof err);
    if (again == NULL) {
      fprintf (stderr, "saved:\n%s\nrefused: %s\n", saved, err);
      CHECK (!"a saved state is refused");
    }
    CHECK (strcmp (text_of (again), saved) == 0);
    json_object_put (again);
    free (saved);
  }
  json_object_put (state);
  return 0;
}
