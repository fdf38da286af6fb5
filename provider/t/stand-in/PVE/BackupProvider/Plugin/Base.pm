# SPDX-License-Identifier: BSD-3-Clause
# STAND-IN for pve-storage's PVE::BackupProvider::Plugin::Base (storage
# API version 11), which this machine does not have: the base class of
# every backup provider.  Like the real one it only names the methods of
# the documented interface, each dying until a subclass implements it;
# vzdump and qemu-server (here: the tests' harness) call them with the
# documented arguments.
package PVE::BackupProvider::Plugin::Base;

use strict;
use warnings;

for my $method (qw(
    new provider_name job_init job_cleanup backup_init backup_cleanup
    backup_get_mechanism backup_handle_log_file backup_vm_query_incremental
    backup_vm backup_container_prepare backup_container restore_get_mechanism
    archive_get_guest_config archive_get_firewall_config restore_vm_init
    restore_vm_cleanup restore_vm_volume_init restore_vm_volume_cleanup
    restore_container_init restore_container_cleanup))
{
    no strict 'refs';
    *{$method} = sub { die "implement me in subclass" };
}

1;
