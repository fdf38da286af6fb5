#!/usr/bin/perl
# SPDX-License-Identifier: BSD-3-Clause
# A device whose bitmap-mode is 'none': qemu-server gives a device no
# bitmap-mode when the provider's answer does not list it (here the
# answer is taken not to list drive-virtio1).  Its export has no bitmap
# and the whole disk is readable: the provider makes a full backup of it
# (a raw image, no bitmap given to the copy), next to an incremental of
# the other disk.  QEMU dropped that device's bitmap, so the next backup,
# for which the provider asks to use it again, is a full one for it
# (bitmap-mode 'new').  Every backup restores to its snapshot.  The
# storage's cbw-cluster-size is exactly the fleecing images' 64K.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;

use ProviderTest;
use PveVm;
use Vzdump;

need_pve_qemu();
my $tmp = scratch();
my ($A, $B) = ('drive-scsi0', 'drive-virtio1');
my $vm = PveVm->new($tmp, disks => [
    { id => 'scsi0', size => 12 << 20, style => 'pve9' },
    { id => 'virtio1', size => 12 << 20, style => 'pve9' },
]);
my $scfg = storage('cbw-cluster-size' => '64K');

sub check_backup {
    my ($res, $what, $modes, $formats) = @_;
    is($res->{error}, undef, "$what succeeds");
    is_deeply($res->{modes}, $modes, "$what: bitmap modes");
    my ($vmid, $sub) = $res->{volname} =~ m!^backup/(\d+)/(.*)$!;
    ok(-f "$scfg->{path}/$vmid/$sub/$_", "$what: $_") for @$formats;
    restored_ok($scfg, $res, $what);
}

$vm->write_disk($A, 0, 12 << 20, 0x71);
$vm->write_disk($B, 0, 12 << 20, 0x72);
check_backup(Vzdump::backup($vm, provider($scfg), time => 3000), 'full backup',
    { $A => 'new', $B => 'new' }, ["$A.raw", "$B.raw"]);

$vm->write_disk($A, 1 << 20, 1 << 20, 0x73);
$vm->write_disk($B, 9 << 20, 1 << 20, 0x74);
log_lines();
my $none = Vzdump::backup($vm, provider($scfg), time => 3001, omit => [$B],
    writes => [[$B, 0, 1 << 20, 0x75]]);
check_backup($none, "a backup with $B\'s bitmap-mode none",
    { $A => 'reuse', $B => 'none' }, ["$A.qcow2", "$B.raw"]);
ok(grep({ /$B: .*full, bitmap mode none/ } log_lines()), "$B is backed up in full");

$vm->write_disk($B, 5 << 20, 1 << 20, 0x76);
my $next = Vzdump::backup($vm, provider($scfg), time => 3002);
is_deeply($next->{query}, { $A => 'use', $B => 'use' }, 'the provider asks to use both bitmaps');
check_backup($next, 'the backup after it', { $A => 'reuse', $B => 'new' }, ["$A.qcow2", "$B.raw"]);

is($vm->quit(), 0, 'QEMU quits with status 0');
is_deeply([leftovers()], [], 'nothing left at the end');
done_testing();
