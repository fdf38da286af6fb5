#!/usr/bin/perl
# SPDX-License-Identifier: BSD-3-Clause
# The file consumer (storage option vm-file-consumer): each disk is
# served through the filter and mounted by backupaccess-helper, and the
# consumer (a stand-in that copies the dirty regions it is given out of
# the file into a delta file) reads it.  Full then incremental: what it
# got, applied to the previous backup, equals the disk at the snapshot.
# A consumer that exits 0 without reading every dirty byte, or that
# fails, fails the backup (vzdump tears down with success=false), and
# the next incremental still holds every change.  Such archives cannot
# be restored through the storage (the disks are the consumer's).
# Nothing is left running or mounted.
use strict;
use warnings;

use Fcntl qw(O_RDONLY O_RDWR SEEK_SET);
use FindBin;
use JSON::PP;
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
    { id => 'virtio1', size => (8 << 20) + (64 << 10), style => 'pve8' },
]);
my $scfg = storage('vm-file-consumer' => "$FindBin::Bin/bin/test-consumer");

# The disk as the consumer holds it: $base with its delta applied.
sub apply_delta {
    my ($base, $res, $dev) = @_;
    my ($vmid, $sub) = $res->{volname} =~ m!^backup/(\d+)/(.*)$!;
    my $dir = "$scfg->{path}/$vmid/$sub";
    my $to = "$tmp/consumed-$sub-$dev.raw";
    system('cp', '--sparse=always', $base, $to) == 0 or die "cp failed\n";
    my $regions = JSON::PP->new->decode(PVE::BackupProvider::Plugin::BackupAccess::Archive::read_file(
        "$dir/$dev.regions.json"));
    sysopen(my $in, "$dir/$dev.delta", O_RDONLY) or die "$dev.delta: $!";
    sysopen(my $out, $to, O_RDWR) or die "$to: $!";
    for my $r (@$regions) {
        sysseek($in, $r->[0], SEEK_SET);
        sysread($in, my $buf, $r->[1]) == $r->[1] or die "short delta";
        sysseek($out, $r->[0], SEEK_SET);
        syswrite($out, $buf);
    }
    return $to;
}

sub consumed_ok {
    my ($res, $bases, $what) = @_;
    my %now;
    for my $dev ($A, $B) {
        $now{$dev} = apply_delta($bases->{$dev}, $res, $dev);
        is(ProviderTest::differs($now{$dev}, $res->{snap}->{$dev}), undef,
            "$what: what the consumer got of $dev, on the previous backup, is the disk at the snapshot");
    }
    return \%now;
}

$vm->write_disk($A, 0, 10 << 20, 0x81);
$vm->write_disk($B, 1 << 20, $vm->size($B) - (1 << 20), 0x82);
my %empty = map { my $f = "$tmp/empty-$_.raw"; open(my $fh, '>', $f); truncate($fh, $vm->size($_)); ($_ => $f) } $A, $B;

my $full = Vzdump::backup($vm, provider($scfg), time => 4000, writes => [[$A, 0, 65536, 0x83]]);
is($full->{error}, undef, 'full backup through the file consumer succeeds');
is_deeply($full->{modes}, { $A => 'new', $B => 'new' }, 'full: new bitmaps');
my $have = consumed_ok($full, \%empty, 'full');
eval { Vzdump::restore(provider($scfg), $full->{volname}, $tmp) };
like($@, qr/handed to the file consumer/, 'its disks are not restored through the storage');
is_deeply([leftovers($vm->pid)], [], 'full: nothing left running or mounted');

$vm->write_disk($A, 5 << 20, 4096, 0x84);
$vm->write_disk($B, 8 << 20, 64 << 10, undef);
my $incr = Vzdump::backup($vm, provider($scfg), time => 4001);
is($incr->{error}, undef, 'incremental through the file consumer succeeds');
is_deeply($incr->{query}, { $A => 'use', $B => 'use' }, 'incr: the provider asks to use the bitmaps');
is_deeply($incr->{modes}, { $A => 'reuse', $B => 'reuse' }, 'incr: bitmaps reused');
$have = consumed_ok($incr, $have, 'incr');

# A consumer that leaves dirty bytes unread, and one that fails.
$vm->write_disk($A, 9 << 20, 1 << 20, 0x85);
{
    local $ENV{TEST_CONSUMER_SKIP} = 1;
    my $skip = Vzdump::backup($vm, provider($scfg), time => 4002);
    like($skip->{error}, qr/exited 0 but left \d+ dirty bytes unread/,
        'a consumer that skips dirty bytes fails the backup');
}
{
    local $ENV{TEST_CONSUMER_FAIL} = 1;
    my $fail = Vzdump::backup($vm, provider($scfg), time => 4003);
    like($fail->{error}, qr/the file consumer failed \(exit 3\)/, 'a failing consumer fails the backup');
}
ok(!-e "$scfg->{path}/100/qemu-$_", "the failed archive $_ is removed") for 4002, 4003;
is_deeply([leftovers($vm->pid)], [], 'after the failures: nothing left running or mounted');

$vm->write_disk($B, 0, 65536, 0x86);
my $after = Vzdump::backup($vm, provider($scfg), time => 4004);
is($after->{error}, undef, 'the next incremental succeeds');
is_deeply($after->{modes}, { $A => 'reuse', $B => 'reuse' }, '... with the bitmaps reused');
consumed_ok($after, $have, 'after the failures');

is($vm->quit(), 0, 'QEMU quits with status 0');
is_deeply([leftovers()], [], 'nothing left at the end');
done_testing();
