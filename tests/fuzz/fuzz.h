/* SPDX-License-Identifier: BSD-3-Clause */
/* Shared by the libFuzzer targets in tests/fuzz (see README there). */
#ifndef BACKUPACCESS_FUZZ_H
#define BACKUPACCESS_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* A failed property is a crash for libFuzzer, which saves the input. */
#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      fprintf (stderr, "%s:%d: property failed: %s\n",                  \
               __FILE__, __LINE__, #cond);                              \
      abort ();                                                         \
    }                                                                   \
  } while (0)

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

#endif /* BACKUPACCESS_FUZZ_H */
