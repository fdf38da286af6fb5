#!/usr/bin/perl
# SPDX-License-Identifier: BSD-3-Clause
# A full backup and two incrementals of a VM with two disks (one attached
# the Proxmox VE 9 way, one the 8 way; fleecing images with 64K and 128K
# clusters) in the real Proxmox VE QEMU, driven as vzdump drives a backup
# provider, while the guest writes; each backup restored the way
# qemu-server restores and compared byte for byte with its disk at its
# snapshot.  The second disk has no change before the second incremental
# (its export cannot be read at all).  Also: the images and their chain,
# discards reaching QEMU (the fleecing image shrinks, read clusters are
# gone from the export), the guest and firewall configurations, the
# bandwidth limit for the whole backup (one copy at a time, each with
# the limit), a base that later backups build on cannot be removed, and
# nothing left running or mounted; QEMU quits with status 0.
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
my $S = 4 << 20;
my ($A, $B) = ('drive-scsi0', 'drive-virtio1');
my $vm = PveVm->new($tmp, disks => [
    { id => 'scsi0', size => 32 << 20, style => 'pve9' },
    { id => 'virtio1', size => (20 << 20) + (192 << 10), style => 'pve8' },
]);
my $scfg = storage();
my %fleecing = (fleecing_cluster => { $A => 64 << 10, $B => 128 << 10 });

sub allocated { my @st = stat($_[0]); return $st[12] * 512 }

# The guest fills the disks (not all of them: some zero regions stay).
$vm->write_disk($A, 0, 20 << 20, 0x11);
$vm->write_disk($A, 24 << 20, 3 << 20, 0x12);
$vm->write_disk($B, 0, $vm->size($B), 0x21);

# Full backup, with guest writes right after the setup (copy-before-write
# copies the old data into the fleecing images) and during backup_vm.
my %grown;
my $full = Vzdump::backup($vm, provider($scfg), time => 1000, %fleecing,
    firewall => "[OPTIONS]\nenable: 1\n",
    after_setup => sub {
        $vm->write_disk($A, 1 << 20, 2 << 20, 0x13);
        $vm->write_disk($B, 8 << 20, 3 << 20, 0x23);
        %grown = map { $_ => allocated("$tmp/$_-fleecing.qcow2") } $A, $B;
    },
    writes => [[$A, 12 << 20, 1 << 20, 0x14], [$B, 17 << 20, 65536, 0x24]],
    before_stop => sub {
        my ($volumes) = @_;
        for my $dev ($A, $B) {
            my $sock = $volumes->{$dev}->{'nbd-path'};
            cmp_ok(system("$FindBin::Bin/bin/nbd-read", $sock, $dev, 0, 65536) >> 8, '==', 1,
                "full: what the backup read of $dev is discarded in QEMU");
            cmp_ok(allocated("$tmp/$dev-fleecing.qcow2"), '<', $grown{$dev} - (1 << 20),
                "full: $dev\'s fleecing image shrank from $grown{$dev} bytes");
        }
    });
is($full->{error}, undef, 'full backup succeeds');
is_deeply([grep { /^warn/ } log_lines()], [], 'full: no warnings (every discard reached QEMU)');
is_deeply($full->{query}, { $A => 'new', $B => 'new' }, 'full: the provider asks for new bitmaps');
is_deeply($full->{modes}, { $A => 'new', $B => 'new' }, 'full: QEMU made new bitmaps');
my $fdir = "$scfg->{path}/100/qemu-1000";
ok(-f "$fdir/$_.raw", "full: $_ is a raw image") for $A, $B;
is((stat("$fdir/$A.raw"))[2] & 07777, 0600, 'full: images are private');
cmp_ok(allocated("$fdir/$A.raw"), '<', 30 << 20, 'full: the raw image is sparse');
ok($full->{result}->{stats}->{'archive-size'} > 0, 'full: archive-size reported');
my $r = restored_ok($scfg, $full, 'full');
is($r->{config}, "name: pvetest\n", 'full: guest configuration kept');
is($r->{firewall}, "[OPTIONS]\nenable: 1\n", 'full: firewall configuration kept');
is_deeply([leftovers($vm->pid)], [], 'full: nothing left running or mounted');

# Guest writes: unaligned, zeroes over data, the partial last 4 MiB of B.
$vm->write_disk($A, (5 << 20) + 4096, 12288, 0x31);
$vm->write_disk($A, 16 << 20, 1 << 20, undef);
$vm->write_disk($A, 31 << 20, 1 << 20, 0x32);
$vm->write_disk($B, $vm->size($B) - 8192, 8192, 0x33);
$vm->write_disk($B, 2 << 20, 512 << 10, undef);
my $incr1 = Vzdump::backup($vm, provider($scfg), time => 1001, %fleecing,
    writes => [[$A, 0, 65536, 0x34]]);
is($incr1->{error}, undef, 'first incremental succeeds');
is_deeply([grep { /^warn/ } log_lines()], [], 'incr1: no warnings');
is_deeply($incr1->{query}, { $A => 'use', $B => 'use' }, 'incr1: the provider asks to use the bitmaps');
is_deeply($incr1->{modes}, { $A => 'reuse', $B => 'reuse' }, 'incr1: QEMU reuses them');
my $idir = "$scfg->{path}/100/qemu-1001";
my $chain = `'$ENV{BACKUPACCESS_QEMU_IMG}' info --backing-chain '$idir/$A.qcow2'`;
like($chain, qr/backing file: \.\.\/qemu-1000\/$A\.raw/, 'incr1: a qcow2 overlay of the full backup');
# 5 of A's 8 blocks of 4 MiB (the bitmap's granularity) are dirty.
cmp_ok(-s "$idir/$A.qcow2", '<', 22 << 20, 'incr1: the overlay holds the dirty blocks only');
restored_ok($scfg, $incr1, 'incr1');
is_deeply([leftovers($vm->pid)], [], 'incr1: nothing left running or mounted');

# Only A changes; B's export cannot be read at all.  With a bandwidth
# limit, through a wrapper that records each copy.
$vm->write_disk($A, 7 << 20, 3 << 20, 0x41);
my $record = "$tmp/copy.record";
local $ENV{BACKUPACCESS_COPY} = "$FindBin::Bin/bin/copy-record";
local $ENV{COPY_RECORD} = $record;
my $incr2 = Vzdump::backup($vm, provider($scfg), time => 1002, %fleecing, bwlimit => 50 << 20);
is($incr2->{error}, undef, 'second incremental succeeds');
my @log2 = log_lines();
is_deeply([grep { /^warn/ } @log2], [], 'incr2: no warnings');
is_deeply($incr2->{modes}, { $A => 'reuse', $B => 'reuse' }, 'incr2: bitmaps reused');
my $i2dir = "$scfg->{path}/100/qemu-1002";
like(`'$ENV{BACKUPACCESS_QEMU_IMG}' info '$i2dir/$B.qcow2'`, qr/qemu-1001\/$B\.qcow2/,
    'incr2: the unchanged disk is an overlay of incr1');
cmp_ok(-s "$i2dir/$B.qcow2", '<', 1 << 20, '... that holds no data');
ok(grep({ /$B: 0 bytes read/ } @log2), '... none was read');
restored_ok($scfg, $incr2, 'incr2');
restored_ok($scfg, $incr1, 'incr1 again');
open(my $fh, '<', $record) or die "$record: $!";
my @rec = <$fh>;
close($fh);
# Without job_init's check (--version) and its end.
for (my $i = 0; $i < @rec; $i++) {
    splice(@rec, $i--, 2) if $rec[$i] =~ /^start --version$/;
}
is(scalar(@rec), 4, 'incr2: one copy per disk');
like($rec[$_], qr/^start .* --bandwidth-limit 52428800 /, "incr2: copy $_ has the whole limit")
    for 0, 2;
like($rec[$_], qr/^end 0$/, "incr2: copy $_ ended before the next started") for 1, 3;
is_deeply([leftovers($vm->pid)], [], 'incr2: nothing left running or mounted');

# Backups that others build on cannot go; the latest can, and then the
# next backup of its disks is a full one.
my $store = 'PVE::Storage::Custom::BackupAccessPlugin';
eval { $store->free_image('store', $scfg, $incr1->{volname}) };
like($@, qr/build on it/, 'a base of later incrementals cannot be removed');
ok(-d $idir, '... and stays');
eval { $store->free_image('store', $scfg, $incr2->{volname}) };
is($@, '', 'the newest backup can be removed');
is_deeply(provider($scfg)->backup_vm_query_incremental(100, { $A => { size => $vm->size($A) },
    $B => { size => $vm->size($B) } }), { $A => 'new', $B => 'new' },
    'with the newest backup gone, the next one is full');

is($vm->quit(), 0, 'QEMU quits with status 0');
is_deeply([leftovers()], [], 'nothing left at the end');
done_testing();
