#!/usr/bin/perl
# SPDX-License-Identifier: BSD-3-Clause
# backup_vm dying half-way: vzdump is stopped (SIGTERM, which
# archive_external turns into a die) while the second disk is being
# copied, after the first one was read and discarded in QEMU.  backup_vm
# dies with nothing of its own left running or mounted, the archive is
# removed, vzdump tears down with success=false, and the next incremental
# still holds every change of both disks: restored, they equal the disks
# at its snapshot.  The storage's cbw-cluster-size is 128K, twice the
# fleecing images' cluster.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);

use ProviderTest;
use PveVm;
use Vzdump;

need_pve_qemu();
my $tmp = scratch();
my ($A, $B) = ('drive-scsi0', 'drive-virtio1');
my $vm = PveVm->new($tmp, disks => [
    { id => 'scsi0', size => 16 << 20, style => 'pve9' },
    { id => 'virtio1', size => 16 << 20, style => 'pve8' },
]);
my $scfg = storage('cbw-cluster-size' => '128K');

# A process of ours whose command line has all of @words, or undef.
sub find_process {
    my (@words) = @_;
    for my $p (values %{ ProviderTest::proc_table() }) {
        return $p if !grep { index($p->{cmd}, $_) < 0 } @words;
    }
    return undef;
}

# Waits (bounded) until B's copy has read something, then stops "vzdump".
sub stop_during_second_disk {
    my ($parent) = @_;
    my $end = time() + 120;
    my $status = "$tmp/run/100.$parent/$B.status.json";
    while (time() < $end) {
        if (find_process('backupaccess-copy', "--export $B ") && -e $status) {
            my $s = eval { PVE::BackupProvider::Plugin::BackupAccess::Archive::read_json($status) };
            if ($s && $s->{'bytes-read'} > 0 && $s->{'bytes-left'} > 0) {
                kill('TERM', $parent);
                return;
            }
        }
        sleep(0.05);
    }
    die "the second disk's copy was never seen\n";
}

$vm->write_disk($A, 0, 16 << 20, 0x51);
$vm->write_disk($B, 0, 16 << 20, 0x52);
my $full = Vzdump::backup($vm, provider($scfg), time => 2000);
is($full->{error}, undef, 'full backup succeeds');

# Changes in both disks; the backup is slow (3 MiB/s) so that it can be
# stopped in the middle of the second disk.
$vm->write_disk($A, 4 << 20, 8 << 20, 0x61);
$vm->write_disk($B, 0, 12 << 20, 0x62);
my $failed = Vzdump::backup($vm, provider($scfg), time => 2001, bwlimit => 3 << 20,
    during => \&stop_during_second_disk);
like($failed->{error}, qr/^interrupted by signal/, 'backup_vm dies when vzdump is stopped');
is_deeply($failed->{modes}, { $A => 'reuse', $B => 'reuse' }, 'it was an incremental');
ok(!-e "$scfg->{path}/100/qemu-2001", 'the unfinished archive is removed');
ok(-e "$scfg->{path}/100/qemu-2001.failed.log", "vzdump's log of it is kept");
ok(!-e "$tmp/run/100.$$", "the provider's run directory is removed");
is_deeply([leftovers($vm->pid)], [], 'nothing left running or mounted');
my $teardown = $vm->qmp->cmd('query-pbs-bitmap-info');
note(explain($teardown));

# More changes, then an incremental: it must still have every change
# since the full backup, including those the failed one read and
# discarded.
$vm->write_disk($B, 14 << 20, 1 << 20, 0x63);
my $incr = Vzdump::backup($vm, provider($scfg), time => 2002);
is($incr->{error}, undef, 'the next incremental succeeds');
is_deeply($incr->{modes}, { $A => 'reuse', $B => 'reuse' }, 'its bitmaps are reused');
like(`'$ENV{BACKUPACCESS_QEMU_IMG}' info '$scfg->{path}/100/qemu-2002/$A.qcow2'`,
    qr/qemu-2000\/$A\.raw/, 'it builds on the full backup');
restored_ok($scfg, $incr, 'incremental after the failure');

is($vm->quit(), 0, 'QEMU quits with status 0');
is_deeply([leftovers()], [], 'nothing left at the end');
done_testing();
