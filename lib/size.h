/* SPDX-License-Identifier: BSD-3-Clause */
/* Sizes on the command line: a decimal number of bytes with an optional
 * K, M, G or T (either case, powers of 1024), the one rule for the
 * helper, backupaccess-mount and backupaccess-copy, so that each takes
 * the same forms and refuses the same way.
 */
#ifndef BACKUPACCESS_SIZE_H
#define BACKUPACCESS_SIZE_H

#include <stdint.h>

#define BA_SIZE_RULE "a number, optionally with K, M, G or T"

/* s as a size of at most max into *value: 0, or -1 with *why the reason
 * ("not a number", "not a size (...)", "too large (at most ...)"), for
 * the caller to print after the option and the value.  *why stays valid
 * until the thread's next call.  No sign, no spaces, no empty string.
 */
int ba_parse_size (const char *s, uint64_t max, uint64_t *value,
                   const char **why);

#endif /* BACKUPACCESS_SIZE_H */
