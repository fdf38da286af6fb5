# SPDX-License-Identifier: BSD-3-Clause
# A disk's backup as one raw file, for restore: qemu-server restores with
# `qemu-img convert -f raw SOURCE ...` and checks first that SOURCE is a
# regular file or block device (so an NBD URI will not do).  A full
# backup is its raw image as it is; an incremental one, the top of a
# qcow2 chain, is served read-only by qemu-nbd and mounted as a file by
# nbdfuse, which stops qemu-nbd when it is unmounted.
package PVE::BackupProvider::Plugin::BackupAccess::Mount;

use strict;
use warnings;

use PVE::BackupProvider::Plugin::BackupAccess::Process qw(private_dir tail_of);

my $Process = 'PVE::BackupProvider::Plugin::BackupAccess::Process';

my $START_TIMEOUT = 60;

# Mounts $image (qcow2) read-only as $dir/$name in the new private
# directory $dir; returns { file, dir, pid, procs }.
sub mount_chain {
    my ($tools, $image, $dir, $name) = @_;
    private_dir($dir);
    my $procs = $Process->new();
    my ($pidfile, $log) = ("$dir.nbdfuse.pid", "$dir.nbdfuse.log");
    unlink($pidfile);
    my $pid = eval {
        my $p = $procs->spawn([$tools->{nbdfuse}, '-r', '-P', $pidfile, "$dir/$name",
            '[', $tools->{'qemu-nbd'}, '-r', '-f', 'qcow2', $image, ']'], log => $log);
        $procs->wait_for_file($pidfile, $p, $START_TIMEOUT, 'nbdfuse');
        $p;
    };
    if (my $err = $@) {
        $procs->stop_all();
        unlink($pidfile);
        rmdir($dir);
        die "cannot mount $image: $err" . tail_of($log, 3) . "\n";
    }
    return { file => "$dir/$name", dir => $dir, pid => $pid, procs => $procs,
        pidfile => $pidfile, log => $log };
}

# Unmounts what mount_chain mounted; nbdfuse and qemu-nbd exit.
sub unmount {
    my ($tools, $m) = @_;
    my ($st) = $m->{procs}->run([$tools->{fusermount}, '-u', $m->{dir}], log => $m->{log});
    # Busy (still open) or already gone: stopping nbdfuse unmounts too.
    $m->{procs}->stop_all();
    $m->{procs}->run([$tools->{fusermount}, '-u', '-z', $m->{dir}], log => $m->{log})
        if $st != 0 && is_mounted($m->{dir});
    unlink($m->{pidfile}, $m->{log});
    rmdir($m->{dir}) or die "rmdir $m->{dir}: $!\n";
}

sub is_mounted {
    my ($dir) = @_;
    open(my $fh, '<', '/proc/self/mounts') or return 0;
    while (my $line = <$fh>) {
        my (undef, $mp) = split(/ /, $line);
        return 1 if $mp eq $dir;
    }
    return 0;
}

1;
