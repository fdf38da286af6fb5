# SPDX-License-Identifier: BSD-3-Clause
# The backup provider of the backupaccess storage (Proxmox VE's backup
# provider API, pve-storage API version 11): vzdump sets up the backup
# access and exports each disk over NBD (mechanism 'nbd'); backup_vm
# copies each export with backupaccess-copy (the backupaccess filter's
# rules) into the storage directory, one disk after the other, a full
# backup as a sparse raw image and an incremental one as a qcow2 overlay
# of the disk's previous backup (or hands each disk to a configured file
# consumer).  Restore is through qemu-img (mechanism 'qemu-img').  Any
# failure dies, so that vzdump tears the backup access down with
# success=false and the next incremental still holds every change.
package PVE::BackupProvider::Plugin::BackupAccess;

use strict;
use warnings;

use File::Path qw(remove_tree);
use Time::HiRes qw(time);

use PVE::BackupProvider::Plugin::BackupAccess::Archive qw(
    $DEVICE_RE parse_volname vm_dir archive_dir read_file write_file_atomic
    write_json_atomic index_of latest set_latest allocated_size);
use PVE::BackupProvider::Plugin::BackupAccess::Copy;
use PVE::BackupProvider::Plugin::BackupAccess::FileConsumer;
use PVE::BackupProvider::Plugin::BackupAccess::Mount;
use PVE::BackupProvider::Plugin::BackupAccess::Process qw(private_dir);

use base qw(PVE::BackupProvider::Plugin::Base);

# The programs and modules used, installed ones by default; the
# environment can name others (the build tree, in the tests).
sub tools {
    return {
        nbdkit => $ENV{BACKUPACCESS_NBDKIT} // 'nbdkit',
        filter => $ENV{BACKUPACCESS_FILTER} // 'backupaccess',
        plugin => $ENV{BACKUPACCESS_PLUGIN} // 'snapshotaccess',
        helper => $ENV{BACKUPACCESS_HELPER} // 'backupaccess-helper',
        copy => $ENV{BACKUPACCESS_COPY} // 'backupaccess-copy',
        nbdfuse => 'nbdfuse',
        fusermount => 'fusermount3',
        'qemu-img' => $ENV{BACKUPACCESS_QEMU_IMG} // 'qemu-img',
        'qemu-nbd' => $ENV{BACKUPACCESS_QEMU_NBD} // 'qemu-nbd',
        'run-root' => $ENV{BACKUPACCESS_RUN_ROOT} // '/run/backupaccess-provider',
    };
}

sub new {
    my ($class, $storage_plugin, $scfg, $storeid, $log_function) = @_;
    return bless {
        'storage-plugin' => $storage_plugin,
        scfg => $scfg,
        storeid => $storeid,
        'log-function' => $log_function,
        tools => tools(),
    }, $class;
}

sub provider_name {
    return 'backupaccess';
}

sub log_info { $_[0]->{'log-function'}->('info', $_[1]) }
sub log_warn { $_[0]->{'log-function'}->('warn', $_[1]) }

# The copy-before-write cluster size that discards are aligned to.
sub cluster_size {
    my ($self) = @_;
    return $self->{'storage-plugin'}->cluster_size($self->{scfg});
}

# What a disk's backups on this storage are: images, or a file consumer's.
sub kind {
    my ($self) = @_;
    my $c = $self->{scfg}->{'vm-file-consumer'};
    return $c ? "consumer:$c" : 'image';
}

# Checks, before any guest is backed up, that the storage is there and
# that the programs run: backupaccess-copy for images; for a file
# consumer, the helper and nbdkit with the filter and the plugin (built
# for this nbdkit).
sub job_init {
    my ($self, $start_time) = @_;
    my $path = $self->{scfg}->{path};
    die "backupaccess storage '$self->{storeid}': '$path' is not a directory\n" if !-d $path;
    my $t = $self->{tools};
    my $procs = PVE::BackupProvider::Plugin::BackupAccess::Process->new();
    my $log = private_dir($t->{'run-root'}) . "/job-init.$$.log";
    my @uses = $self->{scfg}->{'vm-file-consumer'}
        ? ([$t->{nbdkit}, "--filter=$t->{filter}", $t->{plugin}, '--version'], [$t->{helper}, '--help'])
        : ([$t->{copy}, '--version']);
    for my $argv (@uses, [$t->{'qemu-img'}, '--version'], [$t->{'qemu-nbd'}, '--version']) {
        unlink($log);
        my ($st) = eval { $procs->run($argv, log => $log) };
        my $why = $@ || ($st ? PVE::BackupProvider::Plugin::BackupAccess::Process::tail_of($log, 2) : '');
        unlink($log);
        die "backupaccess storage: '@$argv' failed: $why\n" if $@ || $st;
    }
    return;
}

sub job_cleanup {
    return;
}

sub backup_init {
    my ($self, $vmid, $vmtype, $start_time) = @_;
    die "backupaccess storage: only VMs can be backed up, not '$vmtype' guests\n"
        if $vmtype ne 'qemu';
    die "bad VM id '$vmid'\n" if $vmid !~ /^[1-9][0-9]{0,8}$/;
    die "bad start time '$start_time'\n" if $start_time !~ /^[0-9]{1,12}$/;
    my $sub = "qemu-$start_time";
    my $vmdir = vm_dir($self->{scfg}, $vmid);
    mkdir($vmdir, 0700) or $!{EEXIST} or die "mkdir $vmdir: $!\n";
    my $dir = "$vmdir/$sub";
    mkdir($dir, 0700) or die "cannot create the archive directory $dir: $!\n";
    $self->{$vmid} = { archive => $sub, dir => $dir };
    return { 'archive-name' => "$vmid/$sub" };
}

sub backup_get_mechanism {
    my ($self, $vmid, $vmtype) = @_;
    die "backupaccess storage: only VMs can be backed up, not '$vmtype' guests\n"
        if $vmtype ne 'qemu';
    return 'nbd';
}

# What the disk's next incremental would build on, if it still can.
sub usable_previous {
    my ($self, $vmid, $device) = @_;
    my $p = latest($self->{scfg}, $vmid)->{$device} or return undef;
    my $index = eval { index_of($self->{scfg}, "backup/$vmid/$p->{archive}") };
    return undef if !$index || !$index->{devices}->{$device};
    return undef if ($p->{kind} // '') ne $self->kind();
    return undef if $self->kind() eq 'image' && !-e "$self->{scfg}->{path}/$vmid/$p->{archive}/$p->{file}";
    return $p;
}

sub backup_vm_query_incremental {
    my ($self, $vmid, $volumes) = @_;
    my $out = {};
    for my $device (keys %$volumes) {
        my $p = $self->usable_previous($vmid, $device);
        $out->{$device} = $p && $p->{size} == $volumes->{$device}->{size} ? 'use' : 'new';
    }
    return $out;
}

# The disk description for copy_disk / consume_disk, checked.
sub disk_plan {
    my ($self, $vmid, $device, $vol, $run_dir, $bandwidth) = @_;
    die "bad device name '$device'\n" if $device !~ $DEVICE_RE;
    my $mode = $vol->{'bitmap-mode'} // 'none';
    die "$device: unknown bitmap mode '$mode'\n" if $mode !~ /^(none|new|reuse)$/;
    die "$device: no nbd-path: the provider asked for the 'nbd' mechanism\n" if !$vol->{'nbd-path'};
    die "$device: bad size '$vol->{size}'\n" if ($vol->{size} // '') !~ /^[1-9][0-9]*$/;
    my $bitmap = $mode eq 'none' ? undef : $vol->{'bitmap-name'};
    die "$device: bitmap mode '$mode' without a bitmap name\n" if $mode ne 'none' && !defined($bitmap);
    my $d = { device => $device, size => $vol->{size}, 'nbd-path' => $vol->{'nbd-path'},
        bitmap => $bitmap, 'bitmap-mode' => $mode, cluster => $self->cluster_size(),
        bandwidth => $bandwidth, 'run-dir' => $run_dir, vmid => $vmid,
        archive => $self->{$vmid}->{archive}, 'archive-dir' => $self->{$vmid}->{dir} };
    # A reused bitmap holds the changes since the previous backup: only
    # on top of that one is the result the disk.
    my $p = $mode eq 'reuse' ? $self->usable_previous($vmid, $device) : undef;
    die "$device: QEMU reuses the bitmap, but the previous backup is gone\n"
        if $mode eq 'reuse' && !$p;
    die "$device: the size changed since the previous backup\n"
        if $p && $p->{size} != $vol->{size};
    if ($self->{scfg}->{'vm-file-consumer'}) {
        $d->{consumer} = $self->{scfg}->{'vm-file-consumer'};
        return $d;
    }
    if ($p) {
        $d->{backing} = { file => "../$p->{archive}/$p->{file}", format => $p->{format} };
        $d->{file} = "$device.qcow2";
    } else {
        $d->{file} = "$device.raw";
    }
    $d->{target} = "$self->{$vmid}->{dir}/$d->{file}";
    return $d;
}

sub backup_disk {
    my ($self, $d) = @_;
    my $what = $d->{consumer} ? "to the file consumer, bitmap mode $d->{'bitmap-mode'}"
        : $d->{backing} ? "incremental, on $d->{backing}->{file}"
        : "full, bitmap mode $d->{'bitmap-mode'}";
    $self->log_info("$d->{device}: backing up $d->{size} bytes ($what)");
    my $t0 = time();
    if ($d->{consumer}) {
        PVE::BackupProvider::Plugin::BackupAccess::FileConsumer::consume_disk($self->{tools}, $d);
        $self->log_info(sprintf("%s: the file consumer is done (%.1f s)", $d->{device}, time() - $t0));
        return;
    }
    my $c = PVE::BackupProvider::Plugin::BackupAccess::Copy::copy_disk($self->{tools}, $d);
    $self->log_info(sprintf("%s: %d bytes read, %d discarded in QEMU (%.1f s)",
        $d->{device}, $c->{'bytes-read'}, $c->{'bytes-discarded'}, time() - $t0));
    $self->log_warn("$d->{device}: $c->{'trim-errors'} discards failed: the fleecing"
        . " image was not freed there") if $c->{'trim-errors'};
}

sub write_configs {
    my ($self, $vmid, $guest_config, $info) = @_;
    my $dir = $self->{$vmid}->{dir};
    write_file_atomic("$dir/guest.conf", $guest_config);
    write_file_atomic("$dir/firewall.conf", $info->{'firewall-config'})
        if defined($info->{'firewall-config'});
}

# Records the archive as complete, and as what each disk's next
# incremental builds on.
sub commit {
    my ($self, $vmid, $disks) = @_;
    my $kind = $self->kind();
    my ($index, $latest) = ({}, latest($self->{scfg}, $vmid));
    for my $d (@$disks) {
        my $e = { size => $d->{size}, 'bitmap-mode' => $d->{'bitmap-mode'} };
        if ($d->{consumer}) {
            $e->{consumer} = $d->{consumer};
        } else {
            $e->{file} = $d->{file};
            $e->{format} = $d->{backing} ? 'qcow2' : 'raw';
            $e->{backing} = $d->{backing}->{file} if $d->{backing};
        }
        $index->{$d->{device}} = $e;
        $latest->{$d->{device}} = { archive => $self->{$vmid}->{archive}, kind => $kind,
            size => $d->{size}, file => $e->{file}, format => $e->{format} };
    }
    write_json_atomic("$self->{$vmid}->{dir}/index.json",
        { version => 1, vmid => $vmid, vmtype => 'qemu', devices => $index });
    set_latest($self->{scfg}, $vmid, $latest);
}

sub backup_vm {
    my ($self, $vmid, $guest_config, $volumes, $info) = @_;
    die "backup_vm: backup_init was not called for VM $vmid\n" if !$self->{$vmid}->{dir};
    my $bandwidth = $info->{'bandwidth-limit'} // 0;
    die "bad bandwidth limit '$bandwidth'\n" if $bandwidth !~ /^[0-9]+$/;
    $self->log_info("bandwidth limit: $bandwidth bytes/s for the whole backup (one disk"
        . " after the other)") if $bandwidth;
    my $root = private_dir($self->{tools}->{'run-root'});
    my $run_dir = "$root/$vmid.$$";
    remove_tree($run_dir) if -d $run_dir && !-l $run_dir;
    private_dir($run_dir);
    eval {
        my @disks = map { $self->disk_plan($vmid, $_, $volumes->{$_}, $run_dir, $bandwidth) }
            sort keys %$volumes;
        $self->write_configs($vmid, $guest_config, $info);
        $self->backup_disk($_) for @disks;
        $self->commit($vmid, \@disks);
        $self->{$vmid}->{complete} = 1;
    };
    my $err = $@;
    remove_tree($run_dir);
    die $err if $err;
    return;
}

sub backup_cleanup {
    my ($self, $vmid, $vmtype, $success, $info) = @_;
    my $s = $self->{$vmid} or return { stats => { 'archive-size' => 0 } };
    if (!$success) {
        if ($s->{complete}) {
            # backup_vm succeeded, so vzdump ends the backup access with
            # success=true and the bitmap starts afresh: this archive is
            # what the next incremental builds on, and stays.
            $self->log_warn("the backup of VM $vmid itself is complete and stays in $s->{dir}"
                . " (the next incremental builds on it)");
        } elsif (-d $s->{dir}) {
            remove_tree($s->{dir});
        }
        return;
    }
    return { stats => { 'archive-size' => allocated_size($s->{dir}) } };
}

sub backup_handle_log_file {
    my ($self, $vmid, $filename) = @_;
    my $s = $self->{$vmid} or return;
    my $data = read_file($filename);
    my $target = -d $s->{dir} ? "$s->{dir}/backup.log" : "$s->{dir}.failed.log";
    write_file_atomic($target, $data);
}

sub backup_container_prepare {
    die "backupaccess storage: containers are not supported\n";
}

sub backup_container {
    die "backupaccess storage: containers are not supported\n";
}

# Restore.

sub restore_index {
    my ($self, $volname) = @_;
    my $index = index_of($self->{scfg}, $volname)
        or die "$volname: no such complete backup\n";
    return $index;
}

sub restore_get_mechanism {
    my ($self, $volname) = @_;
    $self->restore_index($volname);
    return ('qemu-img', 'qemu');
}

sub archive_get_guest_config {
    my ($self, $volname) = @_;
    $self->restore_index($volname);
    return read_file(archive_dir($self->{scfg}, $volname)
        . '/guest.conf');
}

sub archive_get_firewall_config {
    my ($self, $volname) = @_;
    $self->restore_index($volname);
    my $file = archive_dir($self->{scfg}, $volname) . '/firewall.conf';
    return -e $file ? read_file($file) : undef;
}

sub restore_vm_init {
    my ($self, $volname) = @_;
    my $index = $self->restore_index($volname);
    my $out = {};
    for my $dev (sort keys %{ $index->{devices} }) {
        my $e = $index->{devices}->{$dev};
        die "$volname: disk $dev was handed to the file consumer $e->{consumer}; restore it"
            . " from there\n" if $e->{consumer};
        $out->{$dev} = { size => $e->{size} };
    }
    return $out;
}

sub restore_vm_volume_init {
    my ($self, $volname, $device, $info) = @_;
    my $e = $self->restore_index($volname)->{devices}->{$device}
        or die "$volname has no disk '$device'\n";
    die "$volname: disk $device was handed to the file consumer\n" if $e->{consumer};
    my $image = archive_dir($self->{scfg}, $volname) . "/$e->{file}";
    die "$image is missing\n" if !-e $image;
    return { 'qemu-img-path' => $image } if $e->{format} eq 'raw';
    my $root = private_dir($self->{tools}->{'run-root'});
    my ($vmid, $sub) = parse_volname($volname);
    my $key = "$volname\0$device";
    $self->restore_vm_volume_cleanup($volname, $device) if $self->{mounts}->{$key};
    my $m = PVE::BackupProvider::Plugin::BackupAccess::Mount::mount_chain($self->{tools}, $image,
        "$root/restore.$$.$vmid.$sub.$device", "$device.raw");
    $self->{mounts}->{$key} = $m;
    return { 'qemu-img-path' => $m->{file} };
}

sub restore_vm_volume_cleanup {
    my ($self, $volname, $device, $info) = @_;
    my $m = delete $self->{mounts}->{"$volname\0$device"} or return;
    PVE::BackupProvider::Plugin::BackupAccess::Mount::unmount($self->{tools}, $m);
}

sub restore_vm_cleanup {
    my ($self, $volname) = @_;
    my @err;
    for my $key (grep { /^\Q$volname\E\0/ } keys %{ $self->{mounts} // {} }) {
        my (undef, $device) = split(/\0/, $key, 2);
        eval { $self->restore_vm_volume_cleanup($volname, $device) };
        push @err, $@ if $@;
    }
    die join('', @err) if @err;
}

sub restore_container_init {
    die "backupaccess storage: containers are not supported\n";
}

sub restore_container_cleanup {
    die "backupaccess storage: containers are not supported\n";
}

1;
