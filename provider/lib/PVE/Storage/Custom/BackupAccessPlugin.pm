# SPDX-License-Identifier: BSD-3-Clause
# The backupaccess storage for Proxmox VE (pve-storage API version 11): a
# directory that holds VM backups made through the backupaccess filter,
# with the 'backup-provider' feature, so that vzdump hands each backup to
# PVE::BackupProvider::Plugin::BackupAccess.  Its volumes are the
# archives backup/VMID/qemu-TIME (see BackupAccess/Archive.pm).  Only
# VMs; an archive that later incrementals build on cannot be removed on
# its own, and pruning is not offered.
package PVE::Storage::Custom::BackupAccessPlugin;

use strict;
use warnings;

use File::Path qw(remove_tree);

use PVE::BackupProvider::Plugin::BackupAccess;
use PVE::BackupProvider::Plugin::BackupAccess::Archive qw(
    archive_dir read_file write_file_atomic index_of list_archives
    latest set_latest dependents allocated_size);

use base qw(PVE::Storage::Plugin);

# Copy-before-write clusters up to this size are covered by the default.
my $DEFAULT_CLUSTER = '4M';

sub api {
    return 11;
}

sub type {
    return 'backupaccess';
}

sub plugindata {
    return {
        content => [{ backup => 1 }, { backup => 1 }],
        features => { 'backup-provider' => 1 },
        'sensitive-properties' => {},
    };
}

sub properties {
    return {
        'cbw-cluster-size' => {
            description => "The unit of the discards sent to QEMU while a backup reads:"
                . " a multiple of the copy-before-write cluster (the larger of 64K and"
                . " the fleecing image's cluster), power of two, 64K to 1G.",
            type => 'string',
            pattern => '[0-9]+[KMG]?',
            default => $DEFAULT_CLUSTER,
        },
        'vm-file-consumer' => {
            description => "Hand each disk to this program as a file with its dirty"
                . " regions, instead of storing images.",
            type => 'string',
            format => 'pve-storage-path',
        },
    };
}

sub options {
    return {
        path => { fixed => 1 },
        'cbw-cluster-size' => { optional => 1 },
        'vm-file-consumer' => { optional => 1 },
        nodes => { optional => 1 },
        disable => { optional => 1 },
        content => { optional => 1 },
    };
}

# The cbw-cluster-size in bytes, checked.
sub cluster_size {
    my ($class, $scfg) = @_;
    my $v = $scfg->{'cbw-cluster-size'} // $DEFAULT_CLUSTER;
    $v =~ /^([0-9]+)([KMG]?)$/ or die "cbw-cluster-size '$v': not a size\n";
    my $n = $1 * { '' => 1, K => 1 << 10, M => 1 << 20, G => 1 << 30 }->{$2};
    die "cbw-cluster-size '$v': must be a power of two from 64K to 1G\n"
        if $n < 65536 || $n > (1 << 30) || ($n & ($n - 1));
    return $n;
}

sub new_backup_provider {
    my ($class, $scfg, $storeid, $log_function) = @_;
    cluster_size($class, $scfg);
    return PVE::BackupProvider::Plugin::BackupAccess->new($class, $scfg, $storeid,
        $log_function);
}

sub parse_volname {
    my ($class, $volname) = @_;
    my ($vmid, $sub) = PVE::BackupProvider::Plugin::BackupAccess::Archive::parse_volname($volname);
    return ('backup', "$vmid/$sub", $vmid, undef, undef, undef, 'directory');
}

sub path {
    my ($class, $scfg, $volname, $storeid, $snapname) = @_;
    die "backupaccess storage: no snapshots\n" if $snapname;
    my ($vmid) = PVE::BackupProvider::Plugin::BackupAccess::Archive::parse_volname($volname);
    return (archive_dir($scfg, $volname), $vmid, 'backup');
}

sub activate_storage {
    my ($class, $storeid, $scfg, $cache) = @_;
    die "backupaccess storage '$storeid': '$scfg->{path}' is not a directory\n"
        if !-d $scfg->{path};
    return 1;
}

sub deactivate_storage { return 1 }
sub activate_volume { return 1 }
sub deactivate_volume { return 1 }

sub list_images { return [] }

sub list_volumes {
    my ($class, $storeid, $scfg, $vmid, $content_types) = @_;
    return [] if !grep { $_ eq 'backup' } @$content_types;
    my @res;
    for my $a (@{ list_archives($scfg, $vmid) }) {
        my ($volname, $v, $time) = @$a;
        my $dir = archive_dir($scfg, $volname);
        push @res, {
            volid => "$storeid:$volname", vmid => $v, ctime => $time, content => 'backup',
            format => 'directory', subtype => 'qemu', size => allocated_size($dir),
            protected => -e "$dir/protected" ? 1 : 0,
            notes => -e "$dir/notes" ? read_file("$dir/notes") : undef,
        };
    }
    return \@res;
}

sub volume_size_info {
    my ($class, $scfg, $storeid, $volname, $timeout) = @_;
    my $dir = archive_dir($scfg, $volname);
    die "$volname: no such complete backup\n" if !index_of($scfg, $volname);
    my $size = allocated_size($dir);
    my ($t) = $volname =~ /-([0-9]+)$/;
    return wantarray ? ($size, 'directory', $size, undef, $t) : $size;
}

sub get_volume_attribute {
    my ($class, $scfg, $storeid, $volname, $attribute) = @_;
    my $dir = archive_dir($scfg, $volname);
    return -e "$dir/protected" ? 1 : 0 if $attribute eq 'protected';
    return -e "$dir/notes" ? read_file("$dir/notes") : undef if $attribute eq 'notes';
    return undef;
}

sub update_volume_attribute {
    my ($class, $scfg, $storeid, $volname, $attribute, $value) = @_;
    my $dir = archive_dir($scfg, $volname);
    die "$volname: no such complete backup\n" if !index_of($scfg, $volname);
    if ($attribute eq 'protected') {
        return write_file_atomic("$dir/protected", '') if $value;
        unlink("$dir/protected") or $!{ENOENT} or die "$dir/protected: $!\n";
    } elsif ($attribute eq 'notes') {
        return write_file_atomic("$dir/notes", $value) if defined($value) && $value ne '';
        unlink("$dir/notes") or $!{ENOENT} or die "$dir/notes: $!\n";
    } else {
        die "attribute '$attribute' is not supported by the backupaccess storage\n";
    }
    return;
}

# Removes a backup.  One that a later incremental builds on cannot go on
# its own (that one would be lost too); once a disk's latest backup is
# gone, its next backup is a full one.
sub free_image {
    my ($class, $storeid, $scfg, $volname, $isBase, $format) = @_;
    my ($vmid, $sub) = PVE::BackupProvider::Plugin::BackupAccess::Archive::parse_volname($volname);
    my $dir = archive_dir($scfg, $volname);
    die "$volname is protected\n" if -e "$dir/protected";
    my $deps = dependents($scfg, $volname);
    die "$volname cannot be removed: the incremental backups @$deps build on it;"
        . " remove them first\n" if @$deps;
    my $latest = latest($scfg, $vmid);
    my @mine = grep { $latest->{$_}->{archive} eq $sub } keys %$latest;
    if (@mine) {
        delete $latest->{$_} for @mine;
        set_latest($scfg, $vmid, $latest);
    }
    remove_tree($dir, { error => \my $err });
    die "cannot remove $dir\n" if @$err;
    return undef;
}

sub prune_backups {
    my ($class, $scfg, $storeid, $keep, $vmid, $type, $dryrun, $logfunc) = @_;
    die "the backupaccess storage does not prune: its incremental backups build on older"
        . " ones; remove backups from the newest of a chain backwards\n";
}

sub alloc_image { die "the backupaccess storage holds backups only\n" }
sub create_base { die "the backupaccess storage holds backups only\n" }
sub clone_image { die "the backupaccess storage holds backups only\n" }
sub volume_resize { die "the backupaccess storage holds backups only\n" }
sub volume_snapshot { die "the backupaccess storage has no snapshots\n" }
sub volume_snapshot_rollback { die "the backupaccess storage has no snapshots\n" }
sub volume_snapshot_delete { die "the backupaccess storage has no snapshots\n" }
sub volume_has_feature { return 0 }

1;
