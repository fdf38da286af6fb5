# SPDX-License-Identifier: BSD-3-Clause
# What the provider's tests share: the build tree's filter, plugin,
# helper and copy program and the Proxmox VE QEMU's qemu-img and qemu-nbd for the provider
# (through its environment variables), a private scratch directory, a
# storage and its provider, byte comparison of images, and the check
# that nothing of ours is left running or mounted -- and at the end,
# whatever happened, nothing is.
package ProviderTest;

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);
use Test::More;

use PVE::Storage::Custom::BackupAccessPlugin;

use base qw(Exporter);
our @EXPORT = qw(scratch storage provider differs leftovers need_pve_qemu log_lines
    restored_ok);

our $TOP = $ENV{TOP} // abs_path(dirname(__FILE__) . '/../../..');
my ($SCRATCH, @LOG);

sub need_pve_qemu {
    plan skip_all => 'needs the Proxmox VE QEMU (BACKUPACCESS_PVE_QEMU_BIN): run'
        . ' tests/integration/test-provider.sh'
        if !$ENV{BACKUPACCESS_PVE_QEMU_BIN};
}

# A new scratch directory (short: it holds unix sockets), and the
# provider's environment pointing into it and into the build tree.
sub scratch {
    $SCRATCH = tempdir('ba-prov.XXXXXX', TMPDIR => 1, CLEANUP => 1);
    chmod(0700, $SCRATCH);
    $ENV{BACKUPACCESS_FILTER} = "$TOP/nbdkit-backupaccess-filter.so";
    $ENV{BACKUPACCESS_PLUGIN} = "$TOP/nbdkit-snapshotaccess-plugin.so";
    $ENV{BACKUPACCESS_HELPER} = "$TOP/helper/backupaccess-helper";
    $ENV{BACKUPACCESS_COPY} = "$TOP/copy/backupaccess-copy";
    $ENV{BACKUPACCESS_RUN_ROOT} = "$SCRATCH/run";
    if (my $bin = $ENV{BACKUPACCESS_PVE_QEMU_BIN}) {
        $ENV{BACKUPACCESS_QEMU_IMG} = "$bin/qemu-img";
        $ENV{BACKUPACCESS_QEMU_NBD} = "$bin/qemu-nbd";
    }
    return $SCRATCH;
}

sub storage {
    my (%o) = @_;
    my $path = "$SCRATCH/store";
    mkdir($path, 0700);
    return { type => 'backupaccess', path => $path, content => { backup => 1 }, %o };
}

sub provider {
    my ($scfg, $storeid) = @_;
    return PVE::Storage::Custom::BackupAccessPlugin->new_backup_provider($scfg,
        $storeid // 'store', sub { push @LOG, "$_[0]: $_[1]"; note("$_[0]: $_[1]") });
}

# The provider's log lines since the last call.
sub log_lines {
    my @l = @LOG;
    @LOG = ();
    return @l;
}

# undef if the files hold the same bytes, else where they first differ.
sub differs {
    my ($a, $b) = @_;
    open(my $fa, '<:raw', $a) or return "$a: $!";
    open(my $fb, '<:raw', $b) or return "$b: $!";
    my $off = 0;
    while (1) {
        my $na = read($fa, my $ba, 1 << 20);
        my $nb = read($fb, my $bb, 1 << 20);
        return "read error" if !defined($na) || !defined($nb);
        if ($ba ne $bb) {
            my $i = 0;
            $i++ while $i < length($ba) && $i < length($bb)
                && substr($ba, $i, 1) eq substr($bb, $i, 1);
            return "at byte " . ($off + $i);
        }
        return undef if $na == 0;
        $off += $na;
    }
}

# Restores backup $res (from Vzdump::backup) the way qemu-server does and
# checks that each disk equals the disk at its snapshot.  Returns the
# restore (Vzdump::restore).
sub restored_ok {
    my ($scfg, $res, $what) = @_;
    require Vzdump;
    my $r = eval { Vzdump::restore(provider($scfg), $res->{volname}, $SCRATCH) };
    is($@, '', "$what: restore runs");
    for my $dev (sort keys %{ $res->{snap} }) {
        is(differs($r->{disks}->{$dev}, $res->{snap}->{$dev}), undef,
            "$what: $dev restored equals the disk at the snapshot");
    }
    return $r;
}

sub proc_table {
    my %t;
    for my $pid (grep { /^[0-9]+$/ } map { s!^/proc/!!r } glob('/proc/[0-9]*')) {
        open(my $fh, '<', "/proc/$pid/stat") or next;
        my $stat = <$fh> // next;
        my ($ppid) = $stat =~ /\) \S+ ([0-9]+)/ or next;
        open(my $cf, '<', "/proc/$pid/cmdline") or next;
        my $cmd = do { local $/; <$cf> } // '';
        $t{$pid} = { ppid => $ppid, cmd => join(' ', split(/\0/, $cmd)) };
    }
    return \%t;
}

# What is left of ours: processes below this one (but the VM's QEMU and
# the pids in @keep) or naming the scratch directory, and mounts in it.
sub leftovers {
    my (@keep) = @_;
    my %keep = map { $_ => 1 } @keep;
    my $t = proc_table();
    my @left;
    for my $pid (keys %$t) {
        next if $pid == $$ || $keep{$pid};
        my ($p, $mine) = ($pid, 0);
        for (1 .. 64) {
            $p = $t->{$p}->{ppid} // last;
            last if $keep{$p};
            if ($p == $$) { $mine = 1; last }
        }
        $mine ||= index($t->{$pid}->{cmd}, $SCRATCH) >= 0 && !grep { $keep{$_} } ancestors($t, $pid);
        push @left, "process $pid: $t->{$pid}->{cmd}" if $mine;
    }
    open(my $fh, '<', '/proc/self/mounts') or die;
    push @left, map { "mount $_" } grep { index($_, $SCRATCH) == 0 }
        map { (split(/ /))[1] } <$fh>;
    return sort @left;
}

sub ancestors {
    my ($t, $pid) = @_;
    my @a;
    for (1 .. 64) {
        $pid = $t->{$pid}->{ppid} // last;
        push @a, $pid;
    }
    return @a;
}

# Whatever a failed test left: unmounted, stopped.
END {
    if ($SCRATCH && -d $SCRATCH) {
        open(my $fh, '<', '/proc/self/mounts');
        for my $m (grep { index($_, $SCRATCH) == 0 } map { (split(/ /))[1] } <$fh>) {
            system('fusermount3', '-u', '-z', $m);
        }
        my $t = proc_table();
        for my $pid (keys %$t) {
            kill('KILL', $pid) if $pid != $$ && index($t->{$pid}->{cmd}, $SCRATCH) >= 0;
        }
    }
}

1;
