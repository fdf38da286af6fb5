/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for helper/proxmox-devices.c: the devices of a Proxmox VE
 * backup access found as pve-qemu finds them, in QEMU's answers as the
 * real pve-qemu 10.0.2-4 gives them (trimmed to what is read) for disks
 * attached the VE 9 way (-blockdev), under a throttle node, and the VE 8
 * way (-drive, fleecing by drive_add); and each check that keeps
 * backup-access-setup from failing half-way or aborting, or an
 * incremental backup from missing changes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include <json.h>

#include "proxmox-devices.h"

/* A node of query-named-block-nodes (flat). */
#define NODE(name, drv, ro, size, child, bitmaps)                       \
  "{\"node-name\":\"" name "\",\"drv\":\"" drv "\",\"ro\":" ro ","      \
  "\"image\":{\"virtual-size\":" size ",\"cluster-size\":65536},"       \
  "\"children\":[" child "],\"dirty-bitmaps\":[" bitmaps "]}"
#define FILE_OF(n) "{\"node-name\":\"" n "\",\"child\":\"file\"}"
#define BITMAP(name, recording, busy, inconsistent)                     \
  "{\"name\":\"" name "\",\"recording\":" recording ",\"busy\":" busy   \
  ",\"inconsistent\":" inconsistent ",\"granularity\":4194304}"

/* VE 9: -blockdev, fleecing added by blockdev-add; the device's
 * BlockBackend has no name.
 */
static const char blockdev_blocks[] =
  "[{\"device\":\"\",\"qdev\":\"/machine/peripheral/scsi0/virtio-backend\","
  "\"inserted\":{\"node-name\":\"drive-scsi0\"}}]";
static const char blockdev_nodes[] = "["
  NODE ("drive-scsi0-fleecing", "qcow2", "false", "8388608",
        FILE_OF ("#block030"), "") ","
  NODE ("#block030", "file", "false", "197120", "", "") ","
  NODE ("drive-scsi0", "qcow2", "false", "8388608", FILE_OF ("file-scsi0"),
        "") ","
  NODE ("file-scsi0", "file", "false", "197120", "", "") "]";

/* VE 9 with a throttle group: the throttle node on top. */
#define throttle_blocks blockdev_blocks
static const char throttle_nodes[] = "["
  NODE ("drive-scsi0-fleecing", "qcow2", "false", "8388608",
        FILE_OF ("#block020"), "") ","
  NODE ("f-scsi0-fleecing", "qcow2", "false", "8388608",
        FILE_OF ("#block021"), "") ","
  NODE ("drive-scsi0", "throttle", "false", "8388608", FILE_OF ("f-scsi0"),
        "") ","
  NODE ("f-scsi0", "qcow2", "false", "8388608", FILE_OF ("e-scsi0"),
        BITMAP ("backup", "true", "false", "false")) ","
  NODE ("e-scsi0", "file", "false", "197120", "", "") "]";

/* VE 8: -drive, fleecing by HMP drive_add: BlockBackend names only. */
static const char drive_blocks[] =
  "[{\"device\":\"drive-scsi0\",\"qdev\":\"/machine/peripheral/scsi0/"
  "virtio-backend\",\"inserted\":{\"node-name\":\"#block180\"}},"
  "{\"device\":\"drive-scsi0-fleecing\","
  "\"inserted\":{\"node-name\":\"#block374\"}},"
  "{\"device\":\"drive-ide2\"}]";
static const char drive_nodes[] = "["
  NODE ("#block374", "qcow2", "false", "8388607", FILE_OF ("#block290"),
        "") ","
  NODE ("#block290", "file", "false", "197120", "", "") ","
  NODE ("#block180", "qcow2", "false", "8388608", FILE_OF ("#block006"),
        "") ","
  NODE ("#block006", "file", "false", "197120", "", "") "]";

static char err[1024];

/* pve_find_devices on those answers for names (NULL-ended). */
static int
find (const char *blocks, const char *nodes, const char *mode,
      struct pve_device *d, const char **names)
{
  json_object *b = json_tokener_parse (blocks);
  json_object *n = json_tokener_parse (nodes);
  size_t count = 0;
  int r;

  assert_non_null (b);
  assert_non_null (n);
  for (; names[count]; count++)
    d[count].name = names[count];
  err[0] = '\0';
  r = pve_find_devices (b, n, "backup", mode, d, count, err, sizeof err);
  /* The strings found point into the answers: copied before they go. */
  for (size_t i = 0; i < count && r == 0; i++) {
    static char copies[8][2][64];
    snprintf (copies[i][0], 64, "%s", d[i].node);
    snprintf (copies[i][1], 64, "%s", d[i].fleece_node);
    d[i].node = copies[i][0];
    d[i].fleece_node = copies[i][1];
  }
  json_object_put (b);
  json_object_put (n);
  return r;
}

#define NAMES(...) ((const char *[]) { __VA_ARGS__, NULL })

static void
expect_error (const char *blocks, const char *nodes, const char *mode,
              const char **names, const char *message)
{
  struct pve_device d[8] = { 0 };

  assert_int_equal (find (blocks, nodes, mode, d, names), -1);
  if (strstr (err, message) == NULL)
    fail_msg ("expected \"%s\" in \"%s\"", message, err);
}

static void
test_styles (void **state)
{
  struct pve_device d[2] = { 0 };

  assert_int_equal (find (blockdev_blocks, blockdev_nodes, "use", d,
                          NAMES ("drive-scsi0")), 0);
  assert_string_equal (d[0].node, "drive-scsi0");
  assert_string_equal (d[0].fleece_node, "drive-scsi0-fleecing");
  assert_int_equal (d[0].size, 8388608);
  assert_int_equal (d[0].fleece_cluster, 65536);
  /* Through the throttle node, to where the bitmap goes. */
  assert_int_equal (find (throttle_blocks, throttle_nodes, "use", d,
                          NAMES ("drive-scsi0")), 0);
  assert_string_equal (d[0].node, "f-scsi0");
  assert_string_equal (d[0].fleece_node, "drive-scsi0-fleecing");
  /* BlockBackend names, as QEMU looks first; sizes compared in sectors
   * (8388607 bytes is 16384 of them too).
   */
  assert_int_equal (find (drive_blocks, drive_nodes, "new", d,
                          NAMES ("drive-scsi0")), 0);
  assert_string_equal (d[0].node, "#block180");
  assert_string_equal (d[0].fleece_node, "#block374");
}

static void
test_not_found (void **state)
{
  expect_error (blockdev_blocks, blockdev_nodes, "use", NAMES ("scsi0"),
                "device 'scsi0' not found");
  expect_error (drive_blocks, drive_nodes, "use", NAMES ("drive-ide2"),
                "'drive-ide2' has no medium");
  expect_error (blockdev_blocks, blockdev_nodes, "use", NAMES ("file-scsi0"),
                "'file-scsi0-fleecing' not found");
  expect_error (blockdev_blocks, blockdev_nodes, "use",
                (const char *[]) { NULL }, "no device given");
}

/* nodes with one replacement made: the JSON of a case. */
static char *
with (const char *nodes, const char *from, const char *to)
{
  static char out[8192];
  const char *p = strstr (nodes, from);

  assert_non_null (p);
  snprintf (out, sizeof out, "%.*s%s%s", (int) (p - nodes), nodes, to,
            p + strlen (from));
  return out;
}

static void
test_fleecing (void **state)
{
  expect_error (blockdev_blocks,
                with (blockdev_nodes, "\"node-name\":\"drive-scsi0-fleecing\","
                      "\"drv\":\"qcow2\",\"ro\":false,\"image\":"
                      "{\"virtual-size\":8388608",
                      "\"node-name\":\"drive-scsi0-fleecing\",\"drv\":"
                      "\"qcow2\",\"ro\":false,\"image\":{\"virtual-size\":"
                      "4194304"),
                "use", NAMES ("drive-scsi0"), "must be the same size");
  expect_error (blockdev_blocks,
                with (blockdev_nodes, "\"drive-scsi0-fleecing\",\"drv\":"
                      "\"qcow2\",\"ro\":false",
                      "\"drive-scsi0-fleecing\",\"drv\":\"qcow2\",\"ro\":"
                      "true"),
                "use", NAMES ("drive-scsi0"), "is read-only");
}

static void
test_same_node (void **state)
{
  expect_error (throttle_blocks, throttle_nodes, "use",
                NAMES ("drive-scsi0", "f-scsi0"),
                "drive-scsi0 and f-scsi0 are the same node f-scsi0");
}

static void
test_bitmaps (void **state)
{
  const char *on = BITMAP ("backup", "true", "false", "false");

  const char *background = BITMAP ("backup-access-background-bitmap",
                                   "true", "false", "false");
  struct pve_device d[1] = { 0 };

  expect_error (throttle_blocks, with (throttle_nodes, on, background),
                "new", NAMES ("drive-scsi0"), "has a bitmap "
                "'backup-access-background-bitmap' already");
  /* Without a bitmap QEMU makes none. */
  assert_int_equal (find (throttle_blocks,
                          with (throttle_nodes, on, background), "none", d,
                          NAMES ("drive-scsi0")), 0);
  for (const char *const *m = (const char *const[]) { "none", "new", "use",
                                                      NULL }; *m; m++)
    expect_error (throttle_blocks,
                  with (throttle_nodes, on,
                        BITMAP ("backup", "false", "true", "false")),
                  *m, NAMES ("drive-scsi0"), "is in use");
  expect_error (throttle_blocks,
                with (throttle_nodes, on,
                      BITMAP ("backup", "false", "false", "false")),
                "use", NAMES ("drive-scsi0"), "is disabled");
  expect_error (throttle_blocks,
                with (throttle_nodes, on,
                      BITMAP ("backup", "true", "false", "true")),
                "use", NAMES ("drive-scsi0"), "is inconsistent");
  /* A full backup does not need it. */
  assert_int_equal (find (throttle_blocks,
                          with (throttle_nodes, on,
                                BITMAP ("backup", "false", "false", "true")),
                          "new", d, NAMES ("drive-scsi0")), 0);
}

/* Answers of the wrong shapes: an error or nothing, never an abort. */
static void
test_shapes (void **state)
{
  struct pve_device d[1] = { 0 };

  expect_error (throttle_blocks,
                with (throttle_nodes, "\"children\":[" FILE_OF ("f-scsi0")
                      "]", "\"children\":{\"file\":\"f-scsi0\"}"),
                "use", NAMES ("drive-scsi0"), "not found");
  assert_int_equal (find (blockdev_blocks,
                          with (blockdev_nodes, FILE_OF ("file-scsi0")
                                "],\"dirty-bitmaps\":[]}",
                                FILE_OF ("file-scsi0") "],\"dirty-bitmaps\""
                                ":{\"name\":\"x\"}}"),
                          "use", d, NAMES ("drive-scsi0")), 0);
  expect_error ("{\"device\":\"drive-scsi0\"}", "{}", "use",
                NAMES ("drive-scsi0"), "not found");
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_styles),
    cmocka_unit_test (test_not_found),
    cmocka_unit_test (test_fleecing),
    cmocka_unit_test (test_same_node),
    cmocka_unit_test (test_bitmaps),
    cmocka_unit_test (test_shapes),
  };
  return cmocka_run_group_tests (tests, NULL, NULL);
}
