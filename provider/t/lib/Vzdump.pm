# SPDX-License-Identifier: BSD-3-Clause
# STAND-IN for what vzdump (pve-manager PVE/VZDump.pm) and qemu-server
# (PVE/VZDump/QemuServer.pm archive_external and cleanup;
# PVE/QemuServer.pm restore_external_archive) do around a backup
# provider, written here from their documented behaviour, against a
# real Proxmox VE QEMU:
#
# backup: job_init; backup_init; backup_get_mechanism ('nbd');
#   backup_vm_query_incremental with each disk's size (an answer other
#   than new/use/none dies; a device missing from it gets no bitmap-mode);
#   a qcow2 fleecing image per disk attached as node DEVICE-fleecing with
#   discard on; backup-access-setup {target-id: snapshot-access:STOREID,
#   devices}; bitmap-action mapped to bitmap-mode; nbd-server-start on a
#   unix socket in a 0700 directory; block-export-add per disk (id and
#   name = device, writable, with the bitmap); backup_vm with nbd-path and
#   bitmap-name, and $info {bandwidth-limit, firewall-config}, SIGINT,
#   SIGTERM, ... turned into a die as archive_external does; then, in
#   vzdump's order, backup_cleanup(success) on success, nbd-server-stop,
#   backup-access-teardown {success: backup_vm returned}, fleecing nodes
#   removed, backup_cleanup(failure) on failure, backup_handle_log_file,
#   job_cleanup.
#
# restore: restore_get_mechanism ('qemu-img', 'qemu'); restore_vm_init;
#   archive_get_guest_config and archive_get_firewall_config; per disk
#   restore_vm_volume_init, then qemu-server's checks on the path (a
#   regular file or block device, stat, `qemu-img info -f raw`) and
#   `qemu-img convert -p -n -f raw`, restore_vm_volume_cleanup; at the end
#   restore_vm_cleanup.
package Vzdump;

use strict;
use warnings;

use JSON::PP;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

use Qmp;

my %ACTION_TO_MODE = ('not-used' => 'none', 'not-used-removed' => 'none', new => 'new',
    used => 'reuse', invalid => 'new', 'missing-recreated' => 'new');

sub qemu_img { "$ENV{BACKUPACCESS_PVE_QEMU_BIN}/qemu-img" }

sub add_fleecing {
    my ($vm, $dev, $cluster) = @_;
    my $file = "$vm->{dir}/$dev-fleecing.qcow2";
    system(qemu_img(), 'create', '-q', '-f', 'qcow2', '-o', "cluster_size=$cluster", $file,
        $vm->size($dev)) == 0 or die "qemu-img create $file failed\n";
    $vm->qmp->cmd('blockdev-add', driver => 'qcow2', 'node-name' => "$dev-fleecing",
        discard => 'unmap', file => { driver => 'file', filename => $file, discard => 'unmap' });
    return $file;
}

sub remove_fleecing {
    my ($vm, $dev) = @_;
    eval { $vm->qmp->cmd('blockdev-del', 'node-name' => "$dev-fleecing") };
    warn "fleecing node of $dev: $@" if $@;
    unlink("$vm->{dir}/$dev-fleecing.qcow2");
}

# A child that makes the guest writes @$writes ([dev, off, len, byte])
# through the VM's second monitor while the backup runs.
sub start_writer {
    my ($vm, $writes) = @_;
    my $pid = fork() // die "fork: $!\n";
    return $pid if $pid;
    my $ok = eval {
        my $q = Qmp->new("$vm->{dir}/qmp2.sock");
        $vm->guest_write(@$_, $q) for @$writes;
        1;
    };
    print STDERR "writer: $@" if !$ok;
    POSIX::_exit($ok ? 0 : 1);
}

# The devices, their sizes and the provider's bitmap modes, as
# archive_external builds them.
sub query_modes {
    my ($vm, $provider, $vmid, $o) = @_;
    my %devices = map { $_ => { size => $vm->size($_) } } $vm->devices();
    my $inc = $provider->backup_vm_query_incremental($vmid, \%devices) // {};
    delete $inc->{$_} for @{ $o->{omit} // [] };
    my @qmp_devices;
    for my $dev (sort keys %devices) {
        my $d = { device => $dev };
        if (defined(my $mode = $inc->{$dev})) {
            die "invalid incremental mode '$mode' returned by backup provider plugin\n"
                if $mode !~ /^(new|use|none)$/;
            $d->{'bitmap-mode'} = $mode;
        }
        push @qmp_devices, $d;
    }
    return ($inc, \@qmp_devices);
}

sub export_all {
    my ($vm, $access, $nbd_path) = @_;
    $vm->qmp->cmd('nbd-server-start', addr => { type => 'unix', data => { path => $nbd_path } });
    for my $i (@$access) {
        my %args = (type => 'nbd', id => $i->{device}, 'node-name' => $i->{'node-name'},
            writable => JSON::PP::true, name => $i->{device});
        $args{bitmaps} = [{ node => $i->{'bitmap-node-name'}, name => $i->{'bitmap-name'} }]
            if $i->{'bitmap-name'};
        $vm->qmp->cmd('block-export-add', %args);
    }
}

sub volumes_of {
    my ($access, $nbd_path) = @_;
    my %volumes;
    for my $i (@$access) {
        my ($mode, $bitmap) = ('none', undef);
        if (my $action = $i->{'bitmap-action'}) {
            $mode = $ACTION_TO_MODE{$action} or die "got unexpected bitmap action '$action'\n";
            $bitmap = $i->{'bitmap-name'} or die "bitmap-name is not present\n";
        }
        $volumes{ $i->{device} } = { 'bitmap-mode' => $mode, size => $i->{size},
            'nbd-path' => $nbd_path, 'bitmap-name' => $bitmap };
    }
    return \%volumes;
}

# One vzdump backup of $vm.  %o: vmid, time, storeid, bwlimit (bytes/s),
# firewall (text), writes (guest writes during backup_vm), omit (devices
# the provider's answer is taken not to list), fleecing_cluster
# ({dev => bytes}), after_setup (code run once the disks are exported,
# before backup_vm), during (code run in a child while backup_vm runs,
# given the parent's pid), before_stop (code run after backup_vm, before
# nbd-server-stop, given the volumes).  Returns { volname, modes, snap,
# error, result }.
sub backup {
    my ($vm, $provider, %o) = @_;
    my ($vmid, $storeid) = ($o{vmid} // 100, $o{storeid} // 'store');
    my $res = {};
    $provider->job_init($o{time});
    my $init = $provider->backup_init($vmid, 'qemu', $o{time});
    my $name = $init->{'archive-name'} // '';
    die "backup init failed: illegal characters in archive name '$name'\n"
        if $name !~ m!^([a-zA-Z0-9\-.+=_]|/|:)+$!;
    $res->{volname} = "backup/$name";
    my $mechanism = $provider->backup_get_mechanism($vmid, 'qemu');
    die "mechanism '$mechanism' is not what this harness drives\n" if $mechanism ne 'nbd';
    my ($inc, $devices) = query_modes($vm, $provider, $vmid, \%o);
    $res->{query} = $inc;
    my @fleecing = map { $_->{device} } @$devices;
    add_fleecing($vm, $_, $o{fleecing_cluster}->{$_} // 65536) for @fleecing;
    my $target = "snapshot-access:$storeid";
    my $access = $vm->qmp->cmd('backup-access-setup', 'target-id' => $target, devices => $devices);
    $res->{snap} = $vm->snapshot();
    my $nbd_dir = "$vm->{dir}/$vmid.backup-access.$$";
    mkdir($nbd_dir, 0700) or die "mkdir $nbd_dir: $!\n";
    my $nbd_path = "$nbd_dir/$vmid-nbd.backup-access";
    my $volumes = eval {
        export_all($vm, $access, $nbd_path);
        volumes_of($access, $nbd_path);
    };
    my $err = $@;
    $o{after_setup}->() if $o{after_setup} && !$err;
    $res->{modes} = { map { $_ => $volumes->{$_}->{'bitmap-mode'} } keys %{ $volumes // {} } };
    if (!$err) {
        my %info;
        $info{'bandwidth-limit'} = $o{bwlimit} if $o{bwlimit};
        $info{'firewall-config'} = $o{firewall} if defined($o{firewall});
        my $writer = $o{writes} ? start_writer($vm, $o{writes}) : undef;
        my $during = $o{during} ? start_during($o{during}) : undef;
        eval {
            local $SIG{INT} = local $SIG{TERM} = local $SIG{QUIT} = local $SIG{HUP} =
                local $SIG{PIPE} = sub { die "interrupted by signal\n" };
            $provider->backup_vm($vmid, "name: pvetest\n", $volumes, \%info);
        };
        $err = $@;
        stop_child($during) if $during;
        if ($writer) {
            waitpid($writer, 0);
            die "the guest writer failed\n" if $?;
            $vm->model_write(@$_) for @{ $o{writes} };
        }
        $o{before_stop}->($volumes) if $o{before_stop};
    }
    my $ok = !$err;
    if ($ok) {
        $res->{result} = eval { $provider->backup_cleanup($vmid, 'qemu', 1, {}) };
        $err = $@;
    }
    # qemu-server's cleanup: the NBD server first (an exported bitmap is busy).
    eval { $vm->qmp->cmd('nbd-server-stop') };
    $vm->qmp->cmd('backup-access-teardown', 'target-id' => $target,
        success => $ok ? JSON::PP::true : JSON::PP::false);
    remove_fleecing($vm, $_) for @fleecing;
    rmdir($nbd_dir);
    eval { $provider->backup_cleanup($vmid, 'qemu', 0, { error => $err }) } if $err;
    my $log = "$vm->{dir}/task.log";
    open(my $fh, '>', $log) or die "$log: $!\n";
    print {$fh} "INFO: Backup of VM $vmid " . ($err ? "failed - $err" : "finished") . "\n";
    close($fh);
    $provider->backup_handle_log_file($vmid, $log);
    $provider->job_cleanup();
    $res->{error} = $err || undef;
    return $res;
}

sub start_during {
    my ($code) = @_;
    my $parent = $$;
    my $pid = fork() // die "fork: $!\n";
    return $pid if $pid;
    my $ok = eval { $code->($parent); 1 };
    print STDERR "during: $@" if !$ok;
    POSIX::_exit($ok ? 0 : 1);
}

sub stop_child {
    my ($pid) = @_;
    kill('KILL', $pid);
    waitpid($pid, 0);
}

# A restore as qemu-server does it, each disk into a new raw file in $dir.
# Returns { DEVICE => file } and the guest and firewall configurations.
sub restore {
    my ($provider, $volname, $dir) = @_;
    my ($mechanism, $vmtype) = $provider->restore_get_mechanism($volname);
    die "mechanism '$mechanism' is not supported for VMs\n" if $mechanism ne 'qemu-img';
    die "cannot restore non-VM guest of type '$vmtype'\n" if $vmtype ne 'qemu';
    my %out;
    my $err = eval {
        my $devinfo = $provider->restore_vm_init($volname);
        $out{config} = $provider->archive_get_guest_config($volname)
            or die "backup provider failed to extract guest configuration\n";
        $out{firewall} = $provider->archive_get_firewall_config($volname);
        for my $dev (sort keys %$devinfo) {
            my $target = "$dir/restored-$dev.raw";
            unlink($target);
            system(qemu_img(), 'create', '-q', '-f', 'raw', $target, $devinfo->{$dev}->{size}) == 0
                or die "qemu-img create $target failed\n";
            my $info = $provider->restore_vm_volume_init($volname, $dev, {});
            my $e = eval { convert($info->{'qemu-img-path'}, $target, $devinfo->{$dev}->{size}) };
            my $e2 = $@;
            eval { $provider->restore_vm_volume_cleanup($volname, $dev, {}) };
            die $@ if $@ && !$e2;
            die $e2 if $e2;
            $out{disks}->{$dev} = $target;
        }
        undef;
    } // $@;
    eval { $provider->restore_vm_cleanup($volname) };
    die "backup provider cleanup after restore failed - $@" if $@;
    die $err if $err;
    return \%out;
}

# qemu-server's checks on the source, and its qemu-img convert.
sub convert {
    my ($source, $target, $size) = @_;
    die "did not get source image path from backup provider\n" if !$source;
    die "source '$source' is not a valid volid nor path for qemu-img convert\n"
        if !(-f $source || -b $source);
    my @st = stat($source) or die "failed to stat '$source'\n";
    open(my $ph, '-|', qemu_img(), 'info', '--output=json', '-f', 'raw', $source)
        or die "qemu-img: $!\n";
    my $json = do { local $/; <$ph> };
    close($ph);
    my $info = eval { JSON::PP->new->decode($json) } or die "qemu-img info '$source' failed\n";
    die "$source: virtual size $info->{'virtual-size'}, not $size\n"
        if $info->{'virtual-size'} != $size;
    # Its progress (-p) goes to stderr: stdout is the test's TAP.
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        open(STDOUT, '>&', \*STDERR);
        { exec { qemu_img() } qemu_img(), 'convert', '-p', '-n', '-f', 'raw', '-O', 'raw',
            $source, $target; }
        POSIX::_exit(127);
    }
    waitpid($pid, 0);
    die "qemu-img convert failed\n" if $?;
    return 1;
}

1;
