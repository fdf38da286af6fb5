# SPDX-License-Identifier: BSD-3-Clause
# The layout of a backupaccess storage directory, shared by the storage
# plugin and the backup provider:
#
#   PATH/VMID/qemu-TIME/index.json     what the archive holds (written last)
#   PATH/VMID/qemu-TIME/guest.conf     the guest configuration
#   PATH/VMID/qemu-TIME/firewall.conf  its firewall configuration, if any
#   PATH/VMID/qemu-TIME/DEVICE.raw     a full backup of a disk (sparse)
#   PATH/VMID/qemu-TIME/DEVICE.qcow2   an incremental: a qcow2 overlay whose
#                                      backing file is the disk's previous
#                                      backup (../qemu-TIME0/DEVICE.*)
#   PATH/VMID/qemu-TIME/backup.log     vzdump's task log
#   PATH/VMID/latest.json              per disk, the backup the next
#                                      incremental builds on
#   PATH/VMID/qemu-TIME.failed.log     the task log of a failed backup
#
# The volume name of an archive is backup/VMID/qemu-TIME.  An archive
# without index.json is incomplete (a backup in progress, or one that
# failed) and is not listed.
package PVE::BackupProvider::Plugin::BackupAccess::Archive;

use strict;
use warnings;

use Fcntl qw(O_WRONLY O_CREAT O_EXCL O_RDONLY O_DIRECTORY);
use IO::Handle;
use JSON::PP;

use base qw(Exporter);
our @EXPORT_OK = qw(
    $VOLNAME_RE $DEVICE_RE parse_volname vm_dir archive_dir read_file read_json
    write_file_atomic write_json_atomic index_of list_archives latest set_latest
    dependents allocated_size);

our $VOLNAME_RE = qr!^backup/([1-9][0-9]{0,8})/(qemu-[0-9]{1,12})$!;
# Device names become file names: no slash, no leading dot.
our $DEVICE_RE = qr!^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$!;

my $json = JSON::PP->new->canonical->utf8;

# (vmid, archive subdirectory) of a volume name, or die.
sub parse_volname {
    my ($volname) = @_;
    $volname =~ $VOLNAME_RE or die "unable to parse volume name '$volname'\n";
    return ($1, $2);
}

sub vm_dir {
    my ($scfg, $vmid) = @_;
    return "$scfg->{path}/$vmid";
}

sub archive_dir {
    my ($scfg, $volname) = @_;
    my ($vmid, $sub) = parse_volname($volname);
    return "$scfg->{path}/$vmid/$sub";
}

sub read_file {
    my ($file) = @_;
    open(my $fh, '<:raw', $file) or die "$file: $!\n";
    local $/;
    my $data = <$fh> // '';
    close($fh);
    return $data;
}

sub read_json {
    my ($file) = @_;
    my $data = eval { $json->decode(read_file($file)) };
    die "$file: $@" if $@;
    die "$file: not a JSON object\n" if ref($data) ne 'HASH';
    return $data;
}

sub fsync_dir {
    my ($dir) = @_;
    sysopen(my $dh, $dir, O_RDONLY | O_DIRECTORY) or die "$dir: $!\n";
    $dh->sync() or die "fsync $dir: $!\n";
    close($dh);
}

# Writes $data to $file (mode 0600) through a temporary file that is
# synced and renamed over it, so that a crash leaves the old or the new.
sub write_file_atomic {
    my ($file, $data) = @_;
    my $tmp = "$file.tmp.$$";
    unlink($tmp);
    sysopen(my $fh, $tmp, O_WRONLY | O_CREAT | O_EXCL, 0600) or die "$tmp: $!\n";
    binmode($fh);
    print {$fh} $data or die "write $tmp: $!\n";
    $fh->sync() or die "fsync $tmp: $!\n";
    close($fh) or die "close $tmp: $!\n";
    rename($tmp, $file) or die "rename $tmp: $!\n";
    my ($dir) = $file =~ m!^(.*)/[^/]+$!;
    fsync_dir($dir);
}

sub write_json_atomic {
    my ($file, $data) = @_;
    write_file_atomic($file, $json->encode($data));
}

# The index of a complete archive, or undef.
sub index_of {
    my ($scfg, $volname) = @_;
    my $file = archive_dir($scfg, $volname) . '/index.json';
    return undef if !-e $file;
    return read_json($file);
}

# The complete archives of $vmid (or of every VM), oldest first, as
# [volname, vmid, time].
sub list_archives {
    my ($scfg, $vmid) = @_;
    my @out;
    opendir(my $top, $scfg->{path}) or die "$scfg->{path}: $!\n";
    for my $v (sort grep { /^[1-9][0-9]{0,8}$/ } readdir($top)) {
        next if defined($vmid) && $v != $vmid;
        opendir(my $dh, "$scfg->{path}/$v") or next;
        for my $sub (grep { /^qemu-[0-9]{1,12}$/ } readdir($dh)) {
            next if !-e "$scfg->{path}/$v/$sub/index.json";
            my ($t) = $sub =~ /-([0-9]+)$/;
            push @out, ["backup/$v/$sub", $v, $t];
        }
        closedir($dh);
    }
    closedir($top);
    return [sort { $a->[2] <=> $b->[2] || $a->[0] cmp $b->[0] } @out];
}

# Per disk, what the next incremental of $vmid builds on:
# { DEVICE => { archive => 'qemu-TIME', file => 'DEVICE.raw', format,
# size, kind => 'image'|'consumer' } }.
sub latest {
    my ($scfg, $vmid) = @_;
    my $file = vm_dir($scfg, $vmid) . '/latest.json';
    return {} if !-e $file;
    return read_json($file);
}

sub set_latest {
    my ($scfg, $vmid, $latest) = @_;
    write_json_atomic(vm_dir($scfg, $vmid) . '/latest.json', $latest);
}

# The archives of the same VM whose images have a backing file in
# $volname's archive: they cannot go while it stays.
sub dependents {
    my ($scfg, $volname) = @_;
    my ($vmid, $sub) = parse_volname($volname);
    my @deps;
    for my $a (@{ list_archives($scfg, $vmid) }) {
        next if $a->[0] eq $volname;
        my $index = index_of($scfg, $a->[0]);
        for my $d (values %{ $index->{devices} // {} }) {
            push @deps, $a->[0] if ($d->{backing} // '') =~ m!^\.\./\Q$sub\E/!;
        }
    }
    my %seen;
    return [grep { !$seen{$_}++ } @deps];
}

# Bytes allocated on disk by the files of an archive.
sub allocated_size {
    my ($dir) = @_;
    my $size = 0;
    opendir(my $dh, $dir) or return 0;
    for my $f (readdir($dh)) {
        my @st = lstat("$dir/$f");
        $size += $st[12] * 512 if @st && -f _;
    }
    closedir($dh);
    return $size;
}

1;
