# SPDX-License-Identifier: BSD-3-Clause
# Copies one disk from the NBD export vzdump made into a backup image with
# backupaccess-copy, which reads the export straight with the backupaccess
# filter's rules (only the dirty bytes, in requests that never mix dirty
# and clean ones; discards in whole copy-before-write clusters once their
# bytes are written) and writes a sparse raw image (full backup) or a
# qcow2 overlay of the disk's previous backup (incremental: every dirty
# byte, zeroes too, nothing over the clean regions).  The image exists
# only once it is complete and flushed.  copy_disk is the one place that
# knows how.
package PVE::BackupProvider::Plugin::BackupAccess::Copy;

use strict;
use warnings;

use File::Basename qw(dirname);

use PVE::BackupProvider::Plugin::BackupAccess::Archive;
use PVE::BackupProvider::Plugin::BackupAccess::Process qw(tail_of describe_status);

my $Process = 'PVE::BackupProvider::Plugin::BackupAccess::Process';

# backupaccess-copy's command line for $d, its counters into $status.
sub copy_argv {
    my ($tools, $d, $status) = @_;
    my @argv = ($tools->{copy}, '--socket', $d->{'nbd-path'}, '--export', $d->{device},
        '--cluster', $d->{cluster}, '--status', $status);
    # A new bitmap covers the whole disk: the copy is a full one all the same.
    push @argv, '--bitmap', $d->{bitmap} if defined($d->{bitmap});
    push @argv, '--bandwidth-limit', $d->{bandwidth} if $d->{bandwidth};
    push @argv, '--backing', $d->{backing}->{file}, '--backing-format', $d->{backing}->{format}
        if $d->{backing};
    push @argv, '--format', ($d->{backing} ? 'qcow2' : 'raw'), '--', $d->{target};
    return \@argv;
}

# Copies disk $d = { device, size, 'nbd-path', bitmap (undef: none),
# cluster, bandwidth (bytes/s, 0: none), target, backing (undef, or
# { file, format }: file relative to the target's directory) } using the
# private directory $d->{'run-dir'}.  Returns the copy's counters; dies on
# any failure (the target then does not exist), with nothing of its own
# left running.
sub copy_disk {
    my ($tools, $d) = @_;
    my $procs = $Process->new();
    my $base = "$d->{'run-dir'}/$d->{device}";
    my ($status, $log) = ("$base.status.json", "$base.copy.log");
    # The copy starts qemu-img and qemu-nbd from PATH: the provider's.
    my $path = $tools->{'qemu-nbd'} =~ m{/} ? dirname($tools->{'qemu-nbd'}) . ":$ENV{PATH}"
        : $ENV{PATH};
    my $counters = eval {
        my $copy = $procs->spawn(copy_argv($tools, $d, $status), log => $log,
            env => { PATH => $path });
        my $st = $procs->wait_exit($copy);
        die "$d->{device}: backupaccess-copy failed (" . describe_status($st) . "): "
            . tail_of($log, 3) . "\n" if $st != 0;
        my $c = PVE::BackupProvider::Plugin::BackupAccess::Archive::read_json($status);
        die "$d->{device}: the copy is not complete\n" if !$c->{complete} || !-e $d->{target};
        $c;
    };
    my $err = $@;
    $procs->stop_all();
    unlink($status);
    die $err if $err;
    return $counters;
}

1;
