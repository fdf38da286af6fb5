# SPDX-License-Identifier: BSD-3-Clause
# A small QMP client for the tests: one connection to a QEMU monitor
# socket, commands in order, events kept aside, a bounded wait for each
# reply.
package Qmp;

use strict;
use warnings;

use IO::Select;
use IO::Socket::UNIX;
use JSON::PP;
use Time::HiRes qw(time sleep);

my $json = JSON::PP->new->canonical;

sub new {
    my ($class, $path, $timeout) = @_;
    my $end = time() + ($timeout // 30);
    my $sock;
    until ($sock = IO::Socket::UNIX->new(Type => SOCK_STREAM, Peer => $path)) {
        die "QMP $path: $!\n" if time() > $end;
        sleep(0.05);
    }
    my $self = bless { sock => $sock, buf => '', events => [], timeout => 120 }, $class;
    $self->read_msg();    # the greeting
    $self->cmd('qmp_capabilities');
    return $self;
}

sub read_msg {
    my ($self) = @_;
    my $sel = IO::Select->new($self->{sock});
    my $end = time() + $self->{timeout};
    while ($self->{buf} !~ /\n/) {
        my $left = $end - time();
        die "QMP: no reply within $self->{timeout} s\n" if $left <= 0 || !$sel->can_read($left);
        my $n = sysread($self->{sock}, $self->{buf}, 65536, length($self->{buf}));
        die "QMP: connection closed\n" if !$n;
    }
    $self->{buf} =~ s/^([^\n]*)\n//;
    return $json->decode($1);
}

# The reply to a command: {return => ...} or {error => ...}.
sub raw {
    my ($self, $cmd, $args) = @_;
    my $msg = { execute => $cmd };
    $msg->{arguments} = $args if $args;
    my $line = $json->encode($msg) . "\n";
    syswrite($self->{sock}, $line) == length($line) or die "QMP write: $!\n";
    while (1) {
        my $r = $self->read_msg();
        if ($r->{event}) {
            push @{ $self->{events} }, $r;
            next;
        }
        return $r;
    }
}

# The return value of a command; dies with QEMU's error.
sub cmd {
    my ($self, $cmd, %args) = @_;
    my $r = $self->raw($cmd, %args ? \%args : undef);
    die "QMP $cmd: $r->{error}->{class}: $r->{error}->{desc}\n" if $r->{error};
    return $r->{return};
}

sub hmp {
    my ($self, $line) = @_;
    return $self->cmd('human-monitor-command', 'command-line' => $line);
}

sub disconnect {
    my ($self) = @_;
    CORE::close($self->{sock}) if $self->{sock};
    delete $self->{sock};
}

1;
