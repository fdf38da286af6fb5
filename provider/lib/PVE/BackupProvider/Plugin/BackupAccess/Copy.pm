# SPDX-License-Identifier: BSD-3-Clause
# Copies one disk from the NBD export vzdump made into a backup image:
# nbdkit with the backupaccess filter over the backupaccess plugin in
# front of the export (the read rule, cluster-aligned discards, the dirty
# regions as extents), and nbdcopy reading through it into a sparse raw
# image (full backup) or into a qcow2 overlay of the disk's previous
# backup (incremental), following the recipe of nbdkit-backupaccess(1).
# copy_disk is the one place that knows how; a single copy program can
# take its place without the provider changing.
package PVE::BackupProvider::Plugin::BackupAccess::Copy;

use strict;
use warnings;

use Fcntl qw(O_WRONLY O_CREAT O_EXCL);

use PVE::BackupProvider::Plugin::BackupAccess::Archive;
use PVE::BackupProvider::Plugin::BackupAccess::Process qw(tail_of describe_status);

my $Process = 'PVE::BackupProvider::Plugin::BackupAccess::Process';

# nbdcopy's requests into an overlay must not straddle a dirty and a
# clean region (it would write the zeroes that clean regions read as
# over the previous backup's data): they must divide every boundary of
# the dirty regions.  Proxmox VE's bitmaps have a granularity of 4 MiB;
# the boundaries are read from the bitmap all the same, and a smaller
# alignment makes the requests smaller.
my $MAX_REQUEST_SIZE = 256 * 1024;

# Seconds nbdkit may take to read the bitmap and listen.
my $START_TIMEOUT = 60;

# The nbdkit command line that serves $d's export through the filter.
sub nbdkit_argv {
    my ($tools, $d, $sock, $pidfile, $status) = @_;
    my @argv = ($tools->{nbdkit}, '-f', '--exit-with-parent', '--pidfile', $pidfile,
        '-U', $sock);
    push @argv, '--filter=rate' if $d->{bandwidth};
    push @argv, "--filter=$tools->{filter}", $tools->{plugin},
        "socket=$d->{'nbd-path'}", "export=$d->{device}",
        "cluster=$d->{cluster}", "backupaccess-cluster=$d->{cluster}",
        "backupaccess-status=$status";
    push @argv, "backupaccess-bitmap=$d->{bitmap}" if defined($d->{bitmap});
    push @argv, 'backupaccess-clean=zero' if $d->{backing};
    # The rate filter counts bits.
    push @argv, 'rate=' . ($d->{bandwidth} * 8) if $d->{bandwidth};
    return \@argv;
}

# Creates the empty target: a sparse raw file, or a qcow2 overlay whose
# backing file is the previous backup (a path relative to the target's
# directory).
sub create_target {
    my ($tools, $procs, $d, $log) = @_;
    if (my $b = $d->{backing}) {
        my ($st) = $procs->run([$tools->{'qemu-img'}, 'create', '-q', '-f', 'qcow2',
            '-F', $b->{format}, '-b', $b->{file}, $d->{target}, $d->{size}], log => $log);
        die "qemu-img create $d->{target} failed: " . tail_of($log) . "\n"
            if $st != 0;
        chmod(0600, $d->{target}) or die "chmod $d->{target}: $!\n";
    } else {
        sysopen(my $fh, $d->{target}, O_WRONLY | O_CREAT | O_EXCL, 0600)
            or die "$d->{target}: $!\n";
        truncate($fh, $d->{size}) or die "truncate $d->{target}: $!\n";
        close($fh) or die "close $d->{target}: $!\n";
    }
}

# The request size for dirty regions [[offset, length], ...] of a disk of
# $size bytes: the largest power of two up to $MAX_REQUEST_SIZE that
# divides every boundary inside the disk.
sub request_size {
    my ($size, $dirty) = @_;
    my $req = $MAX_REQUEST_SIZE;
    for my $b (map { ($_->[0], $_->[0] + $_->[1]) } @$dirty) {
        next if $b == 0 || $b >= $size;
        $req >>= 1 while $req > 512 && $b % $req;
    }
    return $req;
}

# The dirty regions of $d's bitmap, read from QEMU's export (only the
# bitmap's meta context: the export itself may not be readable at all).
sub dirty_regions {
    my ($tools, $procs, $d, $log) = @_;
    my $sock = $d->{'nbd-path'} =~ s/([^A-Za-z0-9_.\/-])/sprintf('%%%02X', ord($1))/ger;
    my ($st, $out) = $procs->run([$tools->{nbdinfo}, "--map=qemu:dirty-bitmap:$d->{bitmap}",
        "nbd+unix:///$d->{device}?socket=$sock"], log => $log);
    die "$d->{device}: nbdinfo could not read the dirty bitmap: " . tail_of($log, 2) . "\n"
        if $st != 0;
    my @dirty;
    for my $line (split(/\n/, $out)) {
        $line =~ /^\s*([0-9]+)\s+([0-9]+)\s+([0-9]+)/
            or die "$d->{device}: unexpected output from nbdinfo: $line\n";
        push @dirty, [$1, $2] if $3 & 1;
    }
    return \@dirty;
}

sub nbdcopy_argv {
    my ($tools, $d, $uri, $request_size) = @_;
    # --flush: the image is on disk when nbdcopy succeeds.
    my @argv = ($tools->{nbdcopy}, '--flush', '--destination-is-zero');
    return [@argv, $uri, $d->{target}] if !$d->{backing};
    # Into the overlay: clean regions read as zeroes and are skipped as
    # zero extents; dirty ones are always written, zeroes too (--sparse=0).
    return [@argv, '--sparse=0', "--request-size=$request_size", $uri, '--',
        '[', $tools->{'qemu-nbd'}, '-f', 'qcow2', $d->{target}, ']'];
}

# The filter's counters, written when nbdkit exits.
sub final_status {
    my ($status) = @_;
    die "nbdkit left no status file\n" if !-e $status;
    return PVE::BackupProvider::Plugin::BackupAccess::Archive::read_json($status);
}

# Copies disk $d = { device, size, 'nbd-path', bitmap (undef: none),
# cluster, bandwidth (bytes/s, 0: none), target, backing (undef, or
# { file, format }) } using the private directory $d->{'run-dir'}.
# Returns the filter's counters; dies on any failure, with nothing of
# its own left running.
sub copy_disk {
    my ($tools, $d) = @_;
    my $procs = $Process->new();
    my $base = "$d->{'run-dir'}/$d->{device}";
    my ($sock, $pidfile, $status) = ("$base.sock", "$base.nbdkit.pid", "$base.status.json");
    my ($nbdkit_log, $copy_log) = ("$base.nbdkit.log", "$base.nbdcopy.log");
    my $counters = eval {
        my $request_size = $d->{backing}
            ? request_size($d->{size}, dirty_regions($tools, $procs, $d, $copy_log)) : undef;
        create_target($tools, $procs, $d, $copy_log);
        my $nbdkit = $procs->spawn(nbdkit_argv($tools, $d, $sock, $pidfile, $status),
            log => $nbdkit_log);
        eval { $procs->wait_for_file($pidfile, $nbdkit, $START_TIMEOUT, 'nbdkit') };
        die "$d->{device}: $@" . tail_of($nbdkit_log) . "\n" if $@;
        my $copy = $procs->spawn(nbdcopy_argv($tools, $d, "nbd+unix:///?socket=$sock", $request_size),
            log => $copy_log);
        my $st = $procs->wait_exit($copy);
        $procs->stop($copy);    # its qemu-nbd, if still there
        if ($st != 0) {
            die "$d->{device}: nbdcopy failed ("
                . describe_status($st) . "): "
                . tail_of($copy_log, 3) . "\nnbdkit: "
                . tail_of($nbdkit_log, 3) . "\n";
        }
        $procs->stop($nbdkit);
        my $c = final_status($status);
        die "$d->{device}: the snapshot broke during the backup (copy-before-write"
            . " failed in QEMU): " . tail_of($nbdkit_log, 3) . "\n"
            if $c->{broken};
        # Into an overlay every dirty byte must have been read.
        die "$d->{device}: $c->{'bytes-left'} dirty bytes were not read\n"
            if $d->{backing} && $c->{'bytes-left'} != 0;
        $c;
    };
    my $err = $@;
    $procs->stop_all();
    unlink($sock, $pidfile, $status);
    die $err if $err;
    return $counters;
}

1;
