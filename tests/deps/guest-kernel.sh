#!/bin/sh
# SPDX-License-Identifier: BSD-3-Clause
# Fetches the test guest's kernel (Debian's linux-image-amd64, downloaded
# and unpacked, not installed) into $BACKUPACCESS_GUEST_KERNEL or
# DEPS/guest-kernel, once; see tests/lib/guest.py.  Called by make deps.
exec /usr/bin/python3 "$(dirname "$0")/../lib/guest.py" fetch-kernel
