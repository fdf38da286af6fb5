/* SPDX-License-Identifier: BSD-3-Clause */
/* The helper's command line: every command takes the same options,
 * each using those it needs.
 */
#ifndef BACKUPACCESS_HELPER_OPTIONS_H
#define BACKUPACCESS_HELPER_OPTIONS_H

#include <stdbool.h>
#include <stdint.h>

/* setup's (and serve --nbd-path's --device and --cluster-size). */
struct setup_opts {
  const char *qmp;              /* --qmp, absolute */
  const char *backend;          /* auto, proxmox, upstream */
  const char *target_id;
  const char *bitmap;           /* live bitmap (upstream) / bitmap id */
  const char *bitmap_mode;      /* none, new, use (proxmox) */
  const char *fleecing_dir;     /* real path, checked */
  int64_t cluster;              /* --cluster-size */
  char **devs;                  /* --device, in order */
  int ndevs;
};

/* How serve exposes nbdkit: a unix socket in the run directory, or TCP
 * (--listen), with TLS (--tls-psk) unless --insecure-no-tls.
 */
struct serve_opts {
  int64_t bandwidth;
  const char *listen;           /* HOST:PORT, or NULL */
  const char *tls_psk;          /* PSK file, or NULL */
  bool insecure_no_tls;
  bool clean_zero;              /* --clean zero: backupaccess-clean=zero */
};

/* run --copy-into DEVICE=FILE[,backing=PREV][,backing-format=FMT]: the
 * device copied into FILE by backupaccess-copy.
 */
struct copy_into {
  char *device;
  char *file;
  char *backing;                /* NULL: none */
  char *backing_format;         /* NULL: from PREV's name */
};

struct opts {
  struct setup_opts setup;
  const char *nbd_path;         /* serve --nbd-path, absolute */
  struct serve_opts serve;
  int success;                  /* -1 unset, 0 failure, 1 success */
  bool mount;                   /* run --mount */
  struct copy_into *copies;     /* run --copy-into, in order */
  int ncopies;
};

/* Parses the options after the command name into *o (help: the
 * command's usage, for --help and errors); sets run_dir.  A device of
 * --copy-into that no --device names is added to them.  Dies on a bad
 * option.
 */
void parse_options (int argc, char **argv, struct opts *o, const char *help);

/* What parse_options allocated. */
void free_options (struct opts *o);

#endif /* BACKUPACCESS_HELPER_OPTIONS_H */
