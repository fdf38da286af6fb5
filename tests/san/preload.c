/* SPDX-License-Identifier: BSD-3-Clause */
/* Preloaded into nbdkit, after the ASan runtime, by tests/san/run
 * (make check-asan).  nbdkit itself is not instrumented, so three things
 * go wrong with the runtime merely preloaded:
 *
 * 1. The runtime initialises itself lazily, on the first call it
 *    intercepts.  In nbdkit that is a malloc inside newlocale(), called
 *    by libp11-kit's constructor (nbdkit -> gnutls -> p11-kit) while
 *    glibc holds its locale lock for writing; the runtime's start-up
 *    then calls dlerror(), which takes the same lock for reading, fails,
 *    and unlocks it: the lock is corrupt, and the freelocale() in
 *    p11-kit's destructor hangs nbdkit at exit once anything has called
 *    strerror().  Here newlocale() lets the runtime start (with a
 *    malloc) before glibc takes the lock.
 *
 * 2. The preloaded runtime would be inherited by every program nbdkit
 *    starts (nbdkit --run, plugins that run commands): it is taken out
 *    of the environment before nbdkit's main().
 *
 * 3. nbdkit unloads the filter and the plugin before it exits, and
 *    LeakSanitizer reports at exit: every frame of a leak in our
 *    modules would print as "<unknown module>".  Here dlclose() keeps
 *    the library mapped.
 */
#include <locale.h>
#include <stdlib.h>

static void __attribute__ ((constructor))
not_inherited (void)
{
  unsetenv ("LD_PRELOAD");
}

extern locale_t __newlocale (int, const char *, locale_t);

locale_t
newlocale (int mask, const char *locale, locale_t base)
{
  void *volatile p = malloc (1);  /* volatile: not optimised away */

  free (p);
  return __newlocale (mask, locale, base);
}

int dlclose (void *handle);

int
dlclose (void *handle)
{
  (void) handle;
  return 0;
}
