# SPDX-License-Identifier: BSD-3-Clause
# STAND-IN for pve-storage's PVE::Storage::Plugin, which this machine
# does not have: the base class a custom storage plugin must derive from
# (PVE::Storage checks isa() before it registers one).  The real one
# registers plugins and reads storage.cfg through the methods a plugin
# overrides; the backupaccess storage plugin calls nothing of it, so the
# stand-in is the bare class and the default of the one method the
# backup provider feature adds.
package PVE::Storage::Plugin;

use strict;
use warnings;

sub new_backup_provider {
    die "implement me if enabling the feature 'backup-provider' in plugindata()->{features}\n";
}

1;
