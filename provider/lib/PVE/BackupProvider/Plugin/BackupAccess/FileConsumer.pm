# SPDX-License-Identifier: BSD-3-Clause
# Hands one disk to a consumer program that wants a file: the export
# vzdump made is served through the backupaccess filter and mounted with
# nbdfuse by backupaccess-helper (serve --nbd-path, mount), and the
# consumer reads the file with the dirty regions it is given.  Reads
# discard behind themselves in whole clusters, reads outside the regions
# are refused, and the disk counts as backed up only when the consumer
# exited 0 AND every dirty byte was read (or punched out by it): else
# this dies, vzdump tears down with success=false, and the next
# incremental still has every change.
package PVE::BackupProvider::Plugin::BackupAccess::FileConsumer;

use strict;
use warnings;

use JSON::PP;
use PVE::BackupProvider::Plugin::BackupAccess::Archive qw(read_file);
use PVE::BackupProvider::Plugin::BackupAccess::Process qw(tail_of describe_status);

my $Process = 'PVE::BackupProvider::Plugin::BackupAccess::Process';

# backupaccess-helper takes --cluster-size as a qcow2 cluster size (at
# most 2M), also with --nbd-path.  Any smaller power of two keeps the
# discards aligned for copy-before-write clusters up to that size.
my $HELPER_MAX_CLUSTER = 2 << 20;

sub helper {
    my ($tools, $procs, $log, @args) = @_;
    my ($st, $out) = $procs->run([$tools->{helper}, @args], log => $log);
    die "backupaccess-helper $args[0] failed (" . describe_status($st) . "): "
        . tail_of($log, 3) . "\n" if $st != 0;
    my $res = eval { JSON::PP->new->decode($out) };
    die "backupaccess-helper $args[0]: unexpected output: $out\n" if $@ || ref($res) ne 'HASH';
    return $res;
}

# What the filter's summary, which teardown prints from nbdkit's log,
# says is left unread of the dirty bytes.
sub bytes_left {
    my ($log, $device) = @_;
    my ($left) = read_file($log) =~ /device \Q$device\E: .*backupaccess: summary: .* ([0-9]+) of [0-9]+ readable bytes left/;
    die "$device: nbdkit's summary is missing: " . tail_of($log, 3) . "\n" if !defined($left);
    return $left;
}

sub start {
    my ($tools, $procs, $d, $rd, $log) = @_;
    my $dev = defined($d->{bitmap}) ? "$d->{device}:$d->{bitmap}" : $d->{device};
    my @serve = ('serve', '--run-dir', $rd, '--nbd-path', $d->{'nbd-path'},
        '--device', $dev, '--cluster-size',
        $d->{cluster} < $HELPER_MAX_CLUSTER ? $d->{cluster} : $HELPER_MAX_CLUSTER);
    push @serve, '--bandwidth-limit', $d->{bandwidth} if $d->{bandwidth};
    helper($tools, $procs, $log, @serve);
    my $mounts = helper($tools, $procs, $log, 'mount', '--run-dir', $rd)->{mounts};
    die "backupaccess-helper mount: no file for $d->{device}\n"
        if ref($mounts) ne 'ARRAY' || @$mounts != 1 || !$mounts->[0]->{file};
    return $mounts->[0];
}

# Runs $d->{consumer} for disk $d = { device, size, 'nbd-path', bitmap,
# 'bitmap-mode', cluster, bandwidth, 'run-dir', 'archive-dir', vmid,
# archive } and dies unless it backed up every dirty byte.
sub consume_disk {
    my ($tools, $d) = @_;
    my $procs = $Process->new();
    my $rd = "$d->{'run-dir'}/$d->{device}.helper";
    my $log = "$d->{'run-dir'}/$d->{device}.helper.log";
    my $clog = "$d->{'archive-dir'}/$d->{device}.consumer.log";
    my $ok = eval {
        my $m = start($tools, $procs, $d, $rd, $log);
        my $env = {
            BACKUPACCESS_VMID => $d->{vmid},
            BACKUPACCESS_ARCHIVE => $d->{archive},
            BACKUPACCESS_ARCHIVE_DIR => $d->{'archive-dir'},
            BACKUPACCESS_DEVICE => $d->{device},
            BACKUPACCESS_SIZE => $d->{size},
            BACKUPACCESS_BITMAP_MODE => $d->{'bitmap-mode'},
            BACKUPACCESS_FILE => $m->{file},
            BACKUPACCESS_REGIONS => JSON::PP->new->encode($m->{'dirty-regions'}),
        };
        my $pid = $procs->spawn([$d->{consumer}], env => $env, log => $clog,
            cwd => $d->{'archive-dir'});
        my $st = $procs->wait_exit($pid);
        $procs->stop($pid);     # what it left running in its process group
        die "$d->{device}: the file consumer failed (" . describe_status($st) . "): "
            . tail_of($clog, 3) . "\n" if $st != 0;
        1;
    };
    my $err = $@;
    $procs->stop_all();
    if (-e $rd) {
        # Unmounts, stops nbdkit (which writes the filter's summary).
        my ($st) = $procs->run([$tools->{helper}, 'teardown', '--run-dir', $rd,
            $ok ? '--success' : '--failure'], log => $log);
        $err ||= "backupaccess-helper teardown failed: " . tail_of($log, 3) . "\n" if $st != 0;
        if (!$err) {
            my $left = bytes_left($log, $d->{device});
            $err = "$d->{device}: the file consumer exited 0 but left $left dirty bytes unread\n"
                if $left != 0;
        }
    }
    die $err if $err;
}

1;
