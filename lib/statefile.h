/* SPDX-License-Identifier: BSD-3-Clause */
/* The helper's state file, DIR/state.json: reading and checking it.
 * Apart from the helper so that it can be fuzzed (tests/fuzz).
 */
#ifndef BACKUPACCESS_STATEFILE_H
#define BACKUPACCESS_STATEFILE_H

#include <stddef.h>

#include <json.h>

/* Larger files are refused without being read. */
#define BA_STATE_MAX_SIZE ((size_t) 16 << 20)

/* Parses the text of a state file.  Returns the state (owned by the
 * caller: json_object_put it), or NULL with the reason in errbuf.  A
 * state is a JSON object; its "devices", if any, an array of objects.
 */
json_object *ba_state_parse (const char *text, size_t len,
                             char *errbuf, size_t errlen);

/* Loads the state file at path.  Returns 1 with *state set, 0 when
 * there is no such file, or -1 with a message naming the file in errbuf.
 */
int ba_state_load (const char *path, json_object **state,
                   char *errbuf, size_t errlen);

#endif /* BACKUPACCESS_STATEFILE_H */
