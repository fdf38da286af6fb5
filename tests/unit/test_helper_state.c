/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for the helper's typed state (helper/state.c): files as
 * earlier helpers wrote them (every key in the order it was set, nulls
 * for what was cleared) load into the right members; what is saved
 * loads back the same, member for member; what is saved holds the same
 * keys and values as such a file, bar the nulls; and a missing file is
 * no state.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include <json.h>

#include "cluster.h"
#include "rundir.h"
#include "state.h"

/* An upstream full backup, served and mounted, as the helper wrote it
 * before its state was typed.
 */
static const char upstream_file[] =
  "{\n"
  "  \"backend\":\"upstream\",\n"
  "  \"qmp\":\"\\/run\\/vm\\/qmp.sock\",\n"
  "  \"target-id\":null,\n"
  "  \"devices\":[\n"
  "    {\n"
  "      \"device\":\"drive-scsi0\",\n"
  "      \"export\":\"drive-scsi0\",\n"
  "      \"source-node\":\"drive-scsi0\",\n"
  "      \"size\":8388608,\n"
  "      \"cluster-size\":131072,\n"
  "      \"fleece-file\":"
  "\"\\/var\\/tmp\\/drive-scsi0.98dbb1.fleecing.qcow2\",\n"
  "      \"fleece-node\":\"ba-98dbb1-0-fleece\",\n"
  "      \"created-bitmap\":\"bk\",\n"
  "      \"marker-bitmap\":\"ba-98dbb1-0-full\",\n"
  "      \"live-bitmap\":\"bk\",\n"
  "      \"job\":\"ba-98dbb1-0\",\n"
  "      \"cbw-node\":\"ba-98dbb1-0-cbw\",\n"
  "      \"frozen-bitmap\":null,\n"
  "      \"bitmap-mode\":\"new\",\n"
  "      \"node\":\"ba-98dbb1-0-snapshot\",\n"
  "      \"exported\":true,\n"
  "      \"nbd-path\":\"\\/run\\/ba\\/qemu-nbd.sock\",\n"
  "      \"pidfile\":\"\\/run\\/ba\\/drive-scsi0.nbdkit.pid\",\n"
  "      \"socket\":\"\\/run\\/ba\\/drive-scsi0.sock\",\n"
  "      \"tls-psk\":null,\n"
  "      \"status-file\":\"\\/run\\/ba\\/drive-scsi0.status.json\",\n"
  "      \"nbdkit-log\":\"\\/run\\/ba\\/drive-scsi0.nbdkit.log\",\n"
  "      \"nbdkit-pid\":27700,\n"
  "      \"uri\":"
  "\"nbd+unix:\\/\\/\\/?socket=\\/run\\/ba\\/drive-scsi0.sock\",\n"
  "      \"mount\":\"\\/run\\/ba\\/drive-scsi0.mnt\",\n"
  "      \"mount-pidfile\":\"\\/run\\/ba\\/drive-scsi0.nbdfuse.pid\",\n"
  "      \"file\":\"\\/run\\/ba\\/drive-scsi0.mnt\\/drive-scsi0\"\n"
  "    }\n"
  "  ],\n"
  "  \"tag\":\"98dbb1\",\n"
  "  \"nbd-path\":\"\\/run\\/ba\\/qemu-nbd.sock\",\n"
  "  \"nbd-server-started\":true\n"
  "}\n";

/* Proxmox, two devices, one incremental, served over TCP, with a
 * teardown that stopped after the first export went.
 */
static const char proxmox_file[] =
  "{\n"
  "  \"backend\":\"proxmox\",\n"
  "  \"qmp\":\"\\/run\\/vm\\/qmp.sock\",\n"
  "  \"target-id\":\"bk\",\n"
  "  \"devices\":[\n"
  "    {\n"
  "      \"device\":\"drive-scsi0\",\n"
  "      \"export\":\"drive-scsi0\",\n"
  "      \"node\":\"drive-scsi0-snapshot-access\",\n"
  "      \"size\":8388608,\n"
  "      \"bitmap-mode\":\"reuse\",\n"
  "      \"bitmap-name\":\"bk-frozen\",\n"
  "      \"bitmap-node\":\"drive-scsi0\",\n"
  "      \"fleece-node\":\"drive-scsi0-fleecing\",\n"
  "      \"cluster-size\":65536,\n"
  "      \"exported\":null,\n"
  "      \"nbd-path\":\"\\/run\\/ba\\/qemu-nbd.sock\",\n"
  "      \"pidfile\":null,\n"
  "      \"socket\":null,\n"
  "      \"tls-psk\":\"\\/etc\\/ba\\/backup.psk\",\n"
  "      \"status-file\":\"\\/run\\/ba\\/drive-scsi0.status.json\",\n"
  "      \"nbdkit-log\":\"\\/run\\/ba\\/drive-scsi0.nbdkit.log\",\n"
  "      \"nbdkit-pid\":27897,\n"
  "      \"uri\":\"nbds:\\/\\/backup@127.0.0.1:10809\\/\"\n"
  "    },\n"
  "    {\n"
  "      \"device\":\"drive-virtio1\",\n"
  "      \"export\":\"drive-virtio1\",\n"
  "      \"node\":\"drive-virtio1-snapshot-access\",\n"
  "      \"size\":4194304,\n"
  "      \"bitmap-mode\":\"new\",\n"
  "      \"bitmap-name\":null,\n"
  "      \"bitmap-node\":null,\n"
  "      \"fleece-node\":\"drive-virtio1-fleecing\",\n"
  "      \"cluster-size\":65536,\n"
  "      \"exported\":true,\n"
  "      \"nbd-path\":\"\\/run\\/ba\\/qemu-nbd.sock\"\n"
  "    }\n"
  "  ],\n"
  "  \"proxmox-setup\":true,\n"
  "  \"nbd-path\":\"\\/run\\/ba\\/qemu-nbd.sock\",\n"
  "  \"nbd-server-started\":true\n"
  "}\n";

static char dir[] = "/tmp/test_helper_state.XXXXXX";

static void
write_state (const char *text)
{
  char *path = state_path ();
  FILE *fp = fopen (path, "w");

  assert_non_null (fp);
  assert_int_equal (fputs (text, fp) >= 0, 1);
  assert_int_equal (fclose (fp), 0);
  free (path);
}

static json_object *
read_json (void)
{
  char *path = state_path ();
  json_object *o = json_object_from_file (path);

  assert_non_null (o);
  free (path);
  return o;
}

/* A copy of o without its null members, at any depth. */
static json_object *
without_nulls (json_object *o)
{
  json_object *r;

  if (json_object_is_type (o, json_type_array)) {
    r = json_object_new_array ();
    for (size_t i = 0; i < json_object_array_length (o); i++)
      json_object_array_add (r, without_nulls
                             (json_object_array_get_idx (o, i)));
    return r;
  }
  if (!json_object_is_type (o, json_type_object))
    return json_object_get (o);
  r = json_object_new_object ();
  json_object_object_foreach (o, key, v)
    if (v)
      json_object_object_add (r, key, without_nulls (v));
  return r;
}

static void
test_none (void **unused)
{
  assert_null (state_load ());
  assert_false (state_exists ());
}

static void
test_old_upstream (void **unused)
{
  struct helper_state *st;
  const struct device_state *d;

  write_state (upstream_file);
  assert_true (state_exists ());
  st = state_load ();
  assert_non_null (st);
  assert_string_equal (st->backend, "upstream");
  assert_string_equal (st->qmp, "/run/vm/qmp.sock");
  assert_null (st->target_id);
  assert_string_equal (st->tag, "98dbb1");
  assert_string_equal (st->nbd_path, "/run/ba/qemu-nbd.sock");
  assert_true (st->nbd_server_started);
  assert_false (st->proxmox_setup);
  assert_int_equal (st->ndevices, 1);
  d = &st->devices[0];
  assert_string_equal (d->device, "drive-scsi0");
  assert_string_equal (d->export, "drive-scsi0");
  assert_string_equal (d->node, "ba-98dbb1-0-snapshot");
  assert_int_equal (d->size, 8388608);
  assert_int_equal (d->cluster_size, 131072);
  assert_string_equal (d->bitmap_mode, "new");
  assert_null (d->bitmap_name);
  assert_null (d->bitmap_node);
  assert_string_equal (d->source_node, "drive-scsi0");
  assert_string_equal (d->fleece_file,
                       "/var/tmp/drive-scsi0.98dbb1.fleecing.qcow2");
  assert_string_equal (d->fleece_node, "ba-98dbb1-0-fleece");
  assert_string_equal (d->cbw_node, "ba-98dbb1-0-cbw");
  assert_string_equal (d->job, "ba-98dbb1-0");
  assert_string_equal (d->live_bitmap, "bk");
  assert_null (d->frozen_bitmap);
  assert_string_equal (d->created_bitmap, "bk");
  assert_string_equal (d->marker_bitmap, "ba-98dbb1-0-full");
  assert_true (d->exported);
  assert_string_equal (d->nbd_path, "/run/ba/qemu-nbd.sock");
  assert_string_equal (d->pidfile, "/run/ba/drive-scsi0.nbdkit.pid");
  assert_string_equal (d->socket, "/run/ba/drive-scsi0.sock");
  assert_null (d->tls_psk);
  assert_string_equal (d->status_file, "/run/ba/drive-scsi0.status.json");
  assert_string_equal (d->nbdkit_log, "/run/ba/drive-scsi0.nbdkit.log");
  assert_int_equal (d->nbdkit_pid, 27700);
  assert_string_equal (d->uri,
                       "nbd+unix:///?socket=/run/ba/drive-scsi0.sock");
  assert_string_equal (d->mount, "/run/ba/drive-scsi0.mnt");
  assert_string_equal (d->mount_pidfile, "/run/ba/drive-scsi0.nbdfuse.pid");
  assert_string_equal (d->file, "/run/ba/drive-scsi0.mnt/drive-scsi0");
  state_free (st);
}

static void
test_old_proxmox (void **unused)
{
  struct helper_state *st;

  write_state (proxmox_file);
  st = state_load ();
  assert_non_null (st);
  assert_string_equal (st->backend, "proxmox");
  assert_string_equal (st->target_id, "bk");
  assert_null (st->tag);
  assert_true (st->proxmox_setup);
  assert_int_equal (st->ndevices, 2);
  assert_false (st->devices[0].exported);
  assert_null (st->devices[0].pidfile);
  assert_null (st->devices[0].socket);
  assert_string_equal (st->devices[0].tls_psk, "/etc/ba/backup.psk");
  assert_string_equal (st->devices[0].bitmap_name, "bk-frozen");
  assert_true (st->devices[1].exported);
  assert_int_equal (st->devices[1].size, 4194304);
  assert_null (st->devices[1].bitmap_name);
  assert_int_equal (st->devices[1].nbdkit_pid, 0);
  assert_null (st->devices[1].uri);
  state_free (st);
}

/* Saved, the old files hold the same keys and values, bar the nulls;
 * and that loads back the same.
 */
static void
test_same_keys (void **unused)
{
  const char *files[] = { upstream_file, proxmox_file };

  for (size_t i = 0; i < 2; i++) {
    json_object *old, *saved, *want;
    struct helper_state *st;

    write_state (files[i]);
    old = read_json ();
    st = state_load ();
    state_save (st);
    state_free (st);
    saved = read_json ();
    want = without_nulls (old);
    if (!json_object_equal (saved, want))
      fail_msg ("saved:\n%s\nexpected:\n%s",
                json_object_to_json_string (saved),
                json_object_to_json_string (want));
    /* Load and save again: the same bytes. */
    {
      char *path = state_path (), first[16384], second[16384];
      FILE *fp = fopen (path, "r");
      size_t n1, n2;

      assert_non_null (fp);
      n1 = fread (first, 1, sizeof first, fp);
      fclose (fp);
      st = state_load ();
      state_save (st);
      state_free (st);
      fp = fopen (path, "r");
      assert_non_null (fp);
      n2 = fread (second, 1, sizeof second, fp);
      fclose (fp);
      assert_int_equal (n1, n2);
      assert_memory_equal (first, second, n1);
      free (path);
    }
    json_object_put (old);
    json_object_put (saved);
    json_object_put (want);
  }
}

/* Members that are missing, or of another type than the helper wrote,
 * read as the helper always read them: a number's default, no string,
 * json-c's truth.
 */
static void
test_missing_and_odd (void **unused)
{
  struct helper_state *st;

  write_state ("{\"backend\":\"serve\",\"nbd-server-started\":\"yes\","
               "\"devices\":[{\"device\":\"d\",\"size\":\"7\","
               "\"bitmap-mode\":3,\"exported\":0}]}");
  st = state_load ();
  assert_non_null (st);
  assert_true (st->nbd_server_started);
  assert_int_equal (st->ndevices, 1);
  assert_int_equal (st->devices[0].size, 0);
  assert_int_equal (st->devices[0].cluster_size, BA_CLUSTER_DEFAULT);
  assert_null (st->devices[0].bitmap_mode);
  assert_false (st->devices[0].exported);
  assert_int_equal (st->devices[0].nbdkit_pid, 0);
  state_free (st);

  /* No devices yet: none. */
  write_state ("{\"backend\":\"upstream\",\"qmp\":\"/q\"}");
  st = state_load ();
  assert_non_null (st);
  assert_int_equal (st->ndevices, 0);
  assert_null (st->devices);
  state_free (st);
}

/* Every member set, saved, loaded: the same. */
static void
test_round_trip (void **unused)
{
  struct helper_state *st = state_new ("upstream"), *back;
  struct device_state *d;
  char **strings[] = {
    &st->qmp, &st->target_id, &st->tag, &st->nbd_path,
  };

  for (size_t i = 0; i < sizeof strings / sizeof strings[0]; i++)
    state_set (strings[i], "top");
  st->nbd_server_started = st->proxmox_setup = st->vm_paused = true;
  for (int n = 0; n < 3; n++) {
    char name[16];
    d = state_add_device (st);
    snprintf (name, sizeof name, "dev%d", n);
    {
      char **s[] = {
        &d->device, &d->export, &d->node, &d->bitmap_mode,
        &d->bitmap_name, &d->bitmap_node, &d->source_node, &d->fleece_file,
        &d->fleece_node, &d->cbw_node, &d->job, &d->live_bitmap,
        &d->frozen_bitmap, &d->created_bitmap, &d->marker_bitmap,
        &d->nbd_path, &d->pidfile, &d->socket, &d->tls_psk,
        &d->status_file, &d->nbdkit_log, &d->uri, &d->mount,
        &d->mount_pidfile, &d->file, &d->qdev,
      };
      for (size_t i = 0; i < sizeof s / sizeof s[0]; i++) {
        char v[32];
        snprintf (v, sizeof v, "%s-%zu", name, i);
        state_set (s[i], i == 0 ? name : v);
      }
    }
    d->size = 1000 + n;
    d->cluster_size = 2000 + n;
    d->nbdkit_pid = 3000 + n;
    d->exported = n % 2;
    d->cbw_bitmap = n % 2 == 0;
  }
  state_save (st);
  back = state_load ();
  assert_non_null (back);
  assert_string_equal (back->backend, "upstream");
  assert_string_equal (back->qmp, "top");
  assert_string_equal (back->target_id, "top");
  assert_string_equal (back->tag, "top");
  assert_string_equal (back->nbd_path, "top");
  assert_true (back->nbd_server_started && back->proxmox_setup &&
               back->vm_paused);
  assert_int_equal (back->ndevices, 3);
  for (size_t n = 0; n < 3; n++) {
    const struct device_state *a = &st->devices[n], *b = &back->devices[n];
#define SAME(m) assert_string_equal (a->m, b->m)
    SAME (device); SAME (export); SAME (node); SAME (bitmap_mode);
    SAME (bitmap_name); SAME (bitmap_node); SAME (source_node);
    SAME (fleece_file); SAME (fleece_node); SAME (cbw_node); SAME (job);
    SAME (live_bitmap); SAME (frozen_bitmap); SAME (created_bitmap);
    SAME (marker_bitmap); SAME (nbd_path); SAME (pidfile); SAME (socket);
    SAME (tls_psk); SAME (status_file); SAME (nbdkit_log); SAME (uri);
    SAME (mount); SAME (mount_pidfile); SAME (file); SAME (qdev);
#undef SAME
    assert_int_equal (a->size, b->size);
    assert_int_equal (a->cluster_size, b->cluster_size);
    assert_int_equal (a->nbdkit_pid, b->nbdkit_pid);
    assert_int_equal (a->exported, b->exported);
    assert_int_equal (a->cbw_bitmap, b->cbw_bitmap);
  }
  state_free (st);
  state_free (back);
}

/* Cleared members are left out of the file. */
static void
test_cleared (void **unused)
{
  struct helper_state *st = state_new ("serve");
  struct device_state *d = state_add_device (st);
  json_object *o, *devs, *v;

  state_set (&d->device, "d");
  state_set (&d->pidfile, "/run/ba/d.nbdkit.pid");
  state_set (&d->pidfile, NULL);
  state_save (st);
  state_free (st);
  o = read_json ();
  assert_true (json_object_object_get_ex (o, "devices", &devs));
  v = json_object_array_get_idx (devs, 0);
  assert_false (json_object_object_get_ex (v, "pidfile", NULL));
  assert_false (json_object_object_get_ex (v, "nbdkit-pid", NULL));
  assert_false (json_object_object_get_ex (v, "exported", NULL));
  assert_true (json_object_object_get_ex (v, "size", NULL));
  assert_true (json_object_object_get_ex (v, "cluster-size", NULL));
  assert_false (json_object_object_get_ex (o, "proxmox-setup", NULL));
  json_object_put (o);
}

static int
teardown_dir (void **unused)
{
  char *path = state_path ();

  unlink (path);
  free (path);
  return 0;
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test_teardown (test_none, teardown_dir),
    cmocka_unit_test_teardown (test_old_upstream, teardown_dir),
    cmocka_unit_test_teardown (test_old_proxmox, teardown_dir),
    cmocka_unit_test_teardown (test_same_keys, teardown_dir),
    cmocka_unit_test_teardown (test_missing_and_odd, teardown_dir),
    cmocka_unit_test_teardown (test_round_trip, teardown_dir),
    cmocka_unit_test_teardown (test_cleared, teardown_dir),
  };
  int r;

  if (mkdtemp (dir) == NULL)
    return 1;
  run_dir = dir;
  r = cmocka_run_group_tests (tests, NULL, NULL);
  rmdir (dir);
  return r;
}
