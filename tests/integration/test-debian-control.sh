#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# debian/control's Build-Depends name the Makefile's build packages
# (DEB_BUILD_PACKAGES), no more and no fewer, so that the package and
# make deps cannot drift apart.
set -euo pipefail
cd "$(dirname "$0")/../.."
make_list=$(make -s print-build-deps | tr ' ' '\n' |
              grep -vx -e build-essential -e debhelper | sort -u)
control_list=$(sed -n '/^Build-Depends:/,/^[A-Z][A-Za-z-]*:/p' debian/control |
                 sed '$d; s/^Build-Depends://' | tr ',' '\n' |
                 sed 's/(.*)//; s/[[:space:]]//g' | grep -v '^$' |
                 grep -vx debhelper-compat | sort -u)
if [ "$make_list" != "$control_list" ]; then
  echo "Makefile DEB_BUILD_PACKAGES and debian/control Build-Depends differ:"
  diff <(echo "$make_list") <(echo "$control_list") || true
  exit 1
fi
echo "test-debian-control.sh: $(echo "$make_list" | wc -l) build packages agree"
