#!/usr/bin/perl
# SPDX-License-Identifier: BSD-3-Clause
# The storage plugin and the provider without QEMU: what the plugin
# declares to Proxmox VE, the cbw-cluster-size option and its checks,
# volume names, the provider's answers (mechanism, incremental or not,
# from what the storage holds), bad input to backup_vm dying before it
# changes anything, what a failed backup leaves, the volume listing and
# attributes, and that a backup others build on cannot be removed, nor
# pruned.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;

use ProviderTest;
use PVE::BackupProvider::Plugin::BackupAccess::Archive qw(write_json_atomic);

my $tmp = scratch();
my $P = 'PVE::Storage::Custom::BackupAccessPlugin';
my $scfg = storage();

# The plugin as Proxmox VE sees it.
is($P->api(), 11, 'storage API version 11');
ok($P->isa('PVE::Storage::Plugin'), 'a PVE::Storage::Plugin');
is($P->type(), 'backupaccess', 'type backupaccess');
is_deeply($P->plugindata()->{features}, { 'backup-provider' => 1 }, 'backup-provider feature');
ok(!exists $P->options()->{'prune-backups'}, 'no prune-backups option');
ok($P->options()->{path}->{fixed}, 'path is fixed');
isa_ok(provider($scfg), 'PVE::BackupProvider::Plugin::Base', 'the provider');

# cbw-cluster-size.
is($P->cluster_size({}), 4 << 20, 'cluster size: 4M by default');
is($P->cluster_size({ 'cbw-cluster-size' => '64K' }), 65536, '64K');
is($P->cluster_size({ 'cbw-cluster-size' => '1048576' }), 1 << 20, 'in bytes');
for my $bad ('32K', '48K', '2G', 'x', '') {
    eval { $P->cluster_size({ 'cbw-cluster-size' => $bad }) };
    like($@, qr/cbw-cluster-size '\Q$bad\E'/, "cluster size '$bad' refused");
}
eval { provider(storage('cbw-cluster-size' => '96K')) };
like($@, qr/power of two/, 'a provider with a bad cluster size is not made');

# Volume names.
is_deeply([$P->parse_volname('backup/100/qemu-17')],
    ['backup', '100/qemu-17', 100, undef, undef, undef, 'directory'], 'parse_volname');
for my $bad ('backup/100/../../etc', 'backup/100/lxc-1', 'backup/0/qemu-1', 'images/100/qemu-1',
    'backup/100/qemu-1/x') {
    eval { $P->parse_volname($bad) };
    like($@, qr/unable to parse/, "volume name '$bad' refused");
}

# The copy's command line: the bitmap, the limit, the previous backup.
my $argv = PVE::BackupProvider::Plugin::BackupAccess::Copy::copy_argv({ copy => 'c' }, {
    'nbd-path' => '/q.sock', device => 'drive-scsi0', cluster => 131072, bitmap => 'b:s',
    bandwidth => 1000, backing => { file => '../x/drive-scsi0.raw', format => 'raw' },
    target => '/t/drive-scsi0.qcow2' }, '/r/s.json');
is("@$argv", 'c --socket /q.sock --export drive-scsi0 --cluster 131072 --status /r/s.json'
    . ' --bitmap b:s --bandwidth-limit 1000 --backing ../x/drive-scsi0.raw --backing-format raw'
    . ' --format qcow2 -- /t/drive-scsi0.qcow2', 'the copy of an incremental');
$argv = PVE::BackupProvider::Plugin::BackupAccess::Copy::copy_argv({ copy => 'c' }, {
    'nbd-path' => '/q.sock', device => 'drive-scsi0', cluster => 65536, bandwidth => 0,
    target => '/t/drive-scsi0.raw' }, '/r/s.json');
is("@$argv", 'c --socket /q.sock --export drive-scsi0 --cluster 65536 --status /r/s.json'
    . ' --format raw -- /t/drive-scsi0.raw', 'the copy of a full backup without a bitmap');

# job_init: the storage is there, the programs run (for a file consumer,
# nbdkit loads the filter and the plugin).
eval { provider($scfg)->job_init(1) };
is($@, '', 'job_init with the build tree');
{
    local $ENV{BACKUPACCESS_COPY} = "$tmp/nosuch";
    eval { provider($scfg)->job_init(1) };
    like($@, qr/nosuch --version' failed: /, 'job_init: no copy program');
    local $ENV{BACKUPACCESS_FILTER} = "$tmp/nosuch.so";
    eval { provider({ %$scfg, 'vm-file-consumer' => '/bin/true' })->job_init(1) };
    like($@, qr/failed: .*cannot open filter/, 'job_init: a filter nbdkit cannot load');
}
eval { provider({ %$scfg, path => "$tmp/nosuch" })->job_init(1) };
like($@, qr/is not a directory/, 'job_init: a missing storage directory');

# The provider's answers.
my $p = provider($scfg);
is($p->backup_get_mechanism(100, 'qemu'), 'nbd', 'mechanism nbd for VMs');
eval { $p->backup_get_mechanism(100, 'lxc') };
like($@, qr/only VMs/, 'containers refused');
eval { $p->backup_init(100, 'lxc', 1) };
like($@, qr/only VMs/, 'container backup refused');
is_deeply($p->backup_init(100, 'qemu', 7), { 'archive-name' => '100/qemu-7' }, 'archive name');
my $dir = "$scfg->{path}/100/qemu-7";
is((stat($dir))[2] & 07777, 0700, 'the archive directory is private');
eval { provider($scfg)->backup_init(100, 'qemu', 7) };
like($@, qr/cannot create the archive directory/, 'the same archive twice is refused');

# backup_vm dies on bad input, before it copies anything; the failed
# backup is removed.
my %vol = (size => 1 << 20, 'bitmap-mode' => 'new', 'nbd-path' => "$tmp/nbd.sock",
    'bitmap-name' => 'snapshot-access:store');
for my $case (
    [{ 'drive-scsi0' => { %vol, 'bitmap-mode' => 'used' } }, qr/unknown bitmap mode 'used'/],
    [{ 'drive-scsi0' => { %vol, 'nbd-path' => undef } }, qr/no nbd-path/],
    [{ 'drive-scsi0' => { %vol, 'bitmap-name' => undef } }, qr/without a bitmap name/],
    [{ 'drive-scsi0' => { %vol, 'bitmap-mode' => 'reuse' } }, qr/the previous backup is gone/],
    [{ 'drive-scsi0' => { %vol, 'bitmap-mode' => 'reuse' } }, qr/the previous backup is gone/,
        storage('vm-file-consumer' => '/bin/true')],
    [{ '../x' => \%vol }, qr/bad device name/],
    [{ 'drive-scsi0' => { %vol, size => 0 } }, qr/bad size/])
{
    my $pc = $case->[2] ? provider($case->[2]) : $p;
    $pc->backup_init(100, 'qemu', 9) if $case->[2];
    eval { $pc->backup_vm(100, "name: x\n", $case->[0], {}) };
    like($@, $case->[1], "backup_vm refuses: $case->[1]");
    my $d = $pc->{100}->{dir};
    ok(!-e "$d/drive-scsi0.raw" && !-e "$d/guest.conf", '... and writes nothing');
    $pc->backup_cleanup(100, 'qemu', 0, {}) if $case->[2];
}
# The run directory must be private.
{
    my $open = "$tmp/open";
    mkdir($open, 0755);
    chmod(0755, $open);
    symlink($open, "$tmp/link");
    for my $root ($open, "$tmp/link") {
        local $ENV{BACKUPACCESS_RUN_ROOT} = $root;
        my $pp = provider($scfg);
        $pp->backup_init(100, 'qemu', 8);
        eval { $pp->backup_vm(100, "name: x\n", { 'drive-scsi0' => \%vol }, {}) };
        like($@, qr/must be a directory of this user with mode 0700/, "run root $root refused");
        $pp->backup_cleanup(100, 'qemu', 0, {});
    }
}
eval { $p->backup_vm(100, "name: x\n", { 'drive-scsi0' => \%vol }, { 'bandwidth-limit' => '1M' }) };
like($@, qr/bad bandwidth limit/, 'a bad bandwidth limit is refused');
$p->backup_cleanup(100, 'qemu', 0, { error => 'x' });
ok(!-e $dir, 'a failed backup is removed');
is_deeply([leftovers()], [], 'nothing left running');

# An archive as a successful backup leaves it, made by hand.
sub fake_archive {
    my ($t, $devices, %o) = @_;
    my $d = "$scfg->{path}/100/qemu-$t";
    mkdir("$scfg->{path}/100");
    mkdir($d, 0700);
    my (%index, %latest);
    for my $dev (keys %$devices) {
        my $e = $devices->{$dev};
        open(my $fh, '>', "$d/$e->{file}");
        truncate($fh, 1 << 20);
        close($fh);
        $index{$dev} = { size => 1 << 20, file => $e->{file}, format => $e->{format},
            'bitmap-mode' => 'new', ($e->{backing} ? (backing => $e->{backing}) : ()) };
        $latest{$dev} = { archive => "qemu-$t", kind => 'image', size => 1 << 20,
            file => $e->{file}, format => $e->{format} };
    }
    open(my $fh, '>', "$d/guest.conf");
    print {$fh} "name: x\n";
    close($fh);
    write_json_atomic("$d/index.json", { version => 1, vmid => 100, devices => \%index });
    write_json_atomic("$scfg->{path}/100/latest.json", \%latest) if !$o{stale};
    return "backup/100/qemu-$t";
}

my $v1 = fake_archive(10, { 'drive-scsi0' => { file => 'drive-scsi0.raw', format => 'raw' } });
my $v2 = fake_archive(11, { 'drive-scsi0' => { file => 'drive-scsi0.qcow2', format => 'qcow2',
    backing => '../qemu-10/drive-scsi0.raw' } });
my $q = sub { provider($_[0] // $scfg)->backup_vm_query_incremental(100, { 'drive-scsi0' =>
    { size => $_[1] // 1 << 20 }, 'drive-virtio1' => { size => 1 << 20 } }) };
is_deeply($q->(), { 'drive-scsi0' => 'use', 'drive-virtio1' => 'new' },
    'incremental where a previous backup of the disk exists');
is_deeply($q->(undef, 2 << 20), { 'drive-scsi0' => 'new', 'drive-virtio1' => 'new' },
    'full when the disk has another size');
is_deeply($q->(storage('vm-file-consumer' => '/bin/true')),
    { 'drive-scsi0' => 'new', 'drive-virtio1' => 'new' },
    'full when the previous backup went elsewhere (to an image, not the consumer)');
rename("$scfg->{path}/100/qemu-11/drive-scsi0.qcow2", "$tmp/x");
is_deeply($q->(), { 'drive-scsi0' => 'new', 'drive-virtio1' => 'new' },
    'full when the previous image is missing');
rename("$tmp/x", "$scfg->{path}/100/qemu-11/drive-scsi0.qcow2");

# A failed vzdump after a backup_vm that succeeded keeps the archive.
my $pk = provider($scfg);
$pk->backup_init(100, 'qemu', 12);
$pk->{100}->{complete} = 1;
$pk->backup_cleanup(100, 'qemu', 0, { error => 'later' });
ok(-d "$scfg->{path}/100/qemu-12", 'a complete backup stays when vzdump fails later');
ok(grep({ /is complete and stays/ } log_lines()), '... and says so');
rmdir("$scfg->{path}/100/qemu-12");

# Restore of a full (raw) disk is the image itself.
my $pr = provider($scfg);
is_deeply($pr->restore_vm_init($v1), { 'drive-scsi0' => { size => 1 << 20 } }, 'restore_vm_init');
is_deeply([$pr->restore_get_mechanism($v1)], ['qemu-img', 'qemu'], 'restore mechanism qemu-img');
is($pr->restore_vm_volume_init($v1, 'drive-scsi0', {})->{'qemu-img-path'},
    "$scfg->{path}/100/qemu-10/drive-scsi0.raw", 'a raw image is restored as it is');
is($pr->archive_get_firewall_config($v1), undef, 'no firewall configuration');
eval { $pr->restore_vm_init('backup/100/qemu-99') };
like($@, qr/no such complete backup/, 'restore of a missing backup');

# The volumes, their attributes, removal and pruning.
my @vols = map { $_->{volid} } @{ $P->list_volumes('store', $scfg, 100, ['backup']) };
is_deeply(\@vols, ["store:$v1", "store:$v2"], 'list_volumes');
is_deeply($P->list_volumes('store', $scfg, 100, ['images']), [], 'no images');
$P->update_volume_attribute($scfg, 'store', $v2, 'notes', "a note\n");
is($P->get_volume_attribute($scfg, 'store', $v2, 'notes'), "a note\n", 'notes');
$P->update_volume_attribute($scfg, 'store', $v2, 'protected', 1);
is($P->get_volume_attribute($scfg, 'store', $v2, 'protected'), 1, 'protected');
eval { $P->free_image('store', $scfg, $v2) };
like($@, qr/is protected/, 'a protected backup is not removed');
$P->update_volume_attribute($scfg, 'store', $v2, 'protected', 0);
eval { $P->free_image('store', $scfg, $v1) };
like($@, qr/build on it/, 'a backup others build on is not removed');
ok(-e "$scfg->{path}/100/qemu-10/index.json", '... and is intact');
eval { $P->prune_backups($scfg, 'store', { 'keep-last' => 1 }, 100, 'qemu', 0, sub { }) };
like($@, qr/does not prune/, 'pruning is refused');
eval { $P->free_image('store', $scfg, $v2) };
is($@, '', 'the newest backup is removed');
is_deeply($q->(), { 'drive-scsi0' => 'new', 'drive-virtio1' => 'new' },
    '... and the next backup is full');
eval { $P->free_image('store', $scfg, $v1) };
is($@, '', 'then the one before it');
is_deeply($P->list_volumes('store', $scfg, undef, ['backup']), [], 'nothing left listed');

done_testing();
