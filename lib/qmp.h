/* SPDX-License-Identifier: BSD-3-Clause */
/* A small QMP client over a unix socket, with json-c.  Shared by the
 * helper (and fuzzed through ba_qmp_parse_reply).
 */
#ifndef BACKUPACCESS_QMP_H
#define BACKUPACCESS_QMP_H

#include <stddef.h>

#include <json.h>

struct ba_qmp;

/* Connects, reads the greeting and negotiates capabilities.  Returns
 * NULL with a message in errbuf, and errno: ENOENT or ECONNREFUSED when
 * nothing listens there (QEMU is gone), else why it failed.
 */
struct ba_qmp *ba_qmp_connect (const char *path, int timeout_ms,
                               char *errbuf, size_t errlen);
void ba_qmp_close (struct ba_qmp *q);

/* Runs a command.  args may be NULL; it is not consumed.  Returns the
 * "return" member (owned by the caller: json_object_put it), or NULL
 * with QEMU's error (or the transport error) in errbuf.  *qemu_error,
 * if not NULL, is set to 1 when QEMU answered with an error, 0 when the
 * connection failed.
 */
json_object *ba_qmp_cmd (struct ba_qmp *q, const char *command,
                         json_object *args, int *qemu_error,
                         char *errbuf, size_t errlen);

/* Parses one line of QMP output.  Returns 1 for a reply (*result set to
 * the "return" value, or NULL with the error in errbuf), 0 for an event
 * or greeting (ignored), -1 for malformed input (message in errbuf),
 * which includes a null "return" value (QEMU returns {} for nothing).
 */
int ba_qmp_parse_reply (const char *line, size_t len, json_object **result,
                        char *errbuf, size_t errlen);

/* Longest reply line accepted: query-qmp-schema is about 200 KiB. */
#define BA_QMP_MAX_LINE ((size_t) 16 << 20)

#endif /* BACKUPACCESS_QMP_H */
