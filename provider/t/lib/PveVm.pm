# SPDX-License-Identifier: BSD-3-Clause
# A VM in the real Proxmox VE QEMU (pve-qemu 10.0.2-4, TCG, no guest OS)
# with disks named the way qemu-server names them: one attached the
# Proxmox VE 9 way (a throttle node 'drive-ID' over the qcow2 node, with
# -blockdev), the others the Proxmox VE 8 way (-drive id=drive-ID).  The
# guest writes through HMP qemu-io on each device's backend, and every
# write is also made to a model of the disk (a sparse raw file), so that
# a test knows what each disk held at any time without reading it.
package PveVm;

use strict;
use warnings;

use Fcntl qw(O_RDWR O_CREAT SEEK_SET);
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

use Qmp;

# $o{disks}: [{ id => 'scsi0', size => BYTES, style => 'pve9'|'pve8' }].
sub new {
    my ($class, $dir, %o) = @_;
    my $self = bless { dir => $dir, disks => $o{disks}, snaps => 0 }, $class;
    $self->start();
    return $self;
}

sub bin { return "$ENV{BACKUPACCESS_PVE_QEMU_BIN}/$_[1]" }

sub device_args {
    my ($self, $d) = @_;
    my ($id, $img) = ($d->{id}, "$self->{dir}/disk-$d->{id}.qcow2");
    return ('-drive', "file=$img,if=none,id=drive-$id,format=qcow2,discard=on",
        '-device', "virtio-blk-pci,drive=drive-$id,id=$id") if $d->{style} eq 'pve8';
    return ('-object', "throttle-group,id=throttle-drive-$id",
        '-blockdev', "driver=file,filename=$img,node-name=e-$id,discard=unmap",
        '-blockdev', "driver=qcow2,file=e-$id,node-name=f-$id,discard=unmap",
        '-blockdev', "driver=throttle,throttle-group=throttle-drive-$id,file=f-$id,node-name=drive-$id",
        '-device', "virtio-blk-pci,drive=drive-$id,id=$id");
}

sub start {
    my ($self) = @_;
    my $dir = $self->{dir};
    my @argv = ($self->bin('qemu-system-x86_64'), '-machine', 'q35,accel=tcg', '-nodefaults',
        '-display', 'none', '-m', '128', '-name', 'pvetest',
        (map { ('-L', $_) } split(/:/, $ENV{BACKUPACCESS_PVE_QEMU_FIRMWARE} // '')),
        '-qmp', "unix:$dir/qmp.sock,server=on,wait=off",
        '-qmp', "unix:$dir/qmp2.sock,server=on,wait=off");
    for my $d (@{ $self->{disks} }) {
        system($self->bin('qemu-img'), 'create', '-q', '-f', 'qcow2',
            "$dir/disk-$d->{id}.qcow2", $d->{size}) == 0 or die "qemu-img create failed\n";
        push @argv, $self->device_args($d);
        my $model = $self->model($d->{id});
        open(my $fh, '>', $model) or die "$model: $!\n";
        truncate($fh, $d->{size}) or die "truncate $model: $!\n";
        close($fh);
    }
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        POSIX::setpgid(0, 0);
        open(STDIN, '<', '/dev/null');
        open(STDOUT, '>', "$dir/qemu.log");
        open(STDERR, '>&', \*STDOUT);
        { exec { $argv[0] } @argv; }
        POSIX::_exit(127);
    }
    $self->{pid} = $pid;
    $self->{qmp} = Qmp->new("$dir/qmp.sock");
}

sub qmp { $_[0]->{qmp} }
sub pid { $_[0]->{pid} }
sub devices { return map { "drive-$_->{id}" } @{ $_[0]->{disks} } }
sub disk { my ($self, $dev) = @_; return (grep { "drive-$_->{id}" eq $dev } @{ $self->{disks} })[0] }
sub size { $_[0]->disk($_[1])->{size} }
sub model { "$_[0]->{dir}/model-drive-$_[1].raw" }

# A guest write of $len bytes at $off on device $dev: the byte $byte
# repeated, or zeroes (write -z) when $byte is undef.  Through $qmp (the
# VM's second monitor, for a writer running alongside a backup).
sub guest_write {
    my ($self, $dev, $off, $len, $byte, $qmp) = @_;
    my $id = $self->disk($dev)->{id};
    my $op = defined($byte) ? sprintf('write -P 0x%02x %d %d', $byte, $off, $len)
        : "write -z $off $len";
    my $out = ($qmp // $self->{qmp})->hmp("qemu-io -d /machine/peripheral/$id/virtio-backend \"$op\"");
    die "guest write on $dev failed: $out\n" if $out =~ /\S/;
}

# Applies a write to the model of the disk.
sub model_write {
    my ($self, $dev, $off, $len, $byte) = @_;
    my $file = $self->model($self->disk($dev)->{id});
    sysopen(my $fh, $file, O_RDWR) or die "$file: $!\n";
    sysseek($fh, $off, SEEK_SET) or die "seek: $!\n";
    my $data = (defined($byte) ? chr($byte) : "\0") x $len;
    syswrite($fh, $data) == $len or die "write $file: $!\n";
    close($fh);
}

sub write_disk {
    my ($self, $dev, $off, $len, $byte) = @_;
    $self->guest_write($dev, $off, $len, $byte);
    $self->model_write($dev, $off, $len, $byte);
}

# A copy of each disk's model as it is now: what a backup started now
# must hold.  Returns { DEVICE => file }.
sub snapshot {
    my ($self) = @_;
    my $n = ++$self->{snaps};
    my %out;
    for my $dev ($self->devices()) {
        my $to = "$self->{dir}/snap$n-$dev.raw";
        system('cp', '--sparse=always', $self->model($self->disk($dev)->{id}), $to) == 0
            or die "cp failed\n";
        $out{$dev} = $to;
    }
    return \%out;
}

# Asks QEMU to quit; returns its exit status (it must be 0).
sub quit {
    my ($self) = @_;
    return $self->{status} if defined($self->{status}) || !$self->{pid};
    eval { $self->{qmp}->cmd('quit') };
    my $end = time() + 60;
    while (waitpid($self->{pid}, WNOHANG) != $self->{pid}) {
        if (time() > $end) {
            kill('KILL', -$self->{pid});
            waitpid($self->{pid}, 0);
            return $self->{status} = -1;
        }
        sleep(0.05);
    }
    return $self->{status} = $?;
}

sub DESTROY {
    my ($self) = @_;
    return if defined($self->{status}) || !$self->{pid};
    kill('KILL', -$self->{pid});
    waitpid($self->{pid}, 0);
    $self->{status} = -1;
}

1;
