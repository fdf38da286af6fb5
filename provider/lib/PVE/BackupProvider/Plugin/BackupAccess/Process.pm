# SPDX-License-Identifier: BSD-3-Clause
# The child processes of the backup provider (backupaccess-copy, nbdkit, nbdfuse,
# qemu-img, the helper): each started without a shell in a process group
# of its own, so that it and whatever it started can be stopped as a
# whole, and a record of them that stops every one still running when a
# backup or restore step ends, also when it dies half-way (vzdump turns
# SIGTERM into a die) -- nothing of ours is left running.
package PVE::BackupProvider::Plugin::BackupAccess::Process;

use strict;
use warnings;

use Errno qw(EINTR ESRCH);
use Fcntl qw(O_WRONLY O_CREAT O_APPEND O_RDONLY);
use IO::Handle;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

use base qw(Exporter);
our @EXPORT_OK = qw(private_dir tail_of describe_status);

# How long a stopped process gets after SIGTERM before SIGKILL.
my $STOP_GRACE = 10;

sub new {
    my ($class) = @_;
    return bless { pids => {} }, $class;
}

# Makes $dir (mode 0700) if missing; it must then be a directory of ours
# that nobody else can enter, not a symbolic link.
sub private_dir {
    my ($dir) = @_;
    mkdir($dir, 0700) or $!{EEXIST} or die "mkdir $dir: $!\n";
    my @st = lstat($dir) or die "stat $dir: $!\n";
    die "$dir must be a directory of this user with mode 0700, not a link\n"
        if -l _ || !-d _ || $st[4] != $< || ($st[2] & 07777) != 0700;
    return $dir;
}

# Starts @$argv (no shell) in a new process group, stdin from /dev/null,
# stdout and stderr appended to $o{log} (else /dev/null), with $o{env}
# added to the environment.  Returns the pid.
sub spawn {
    my ($self, $argv, %o) = @_;
    my $log = $o{log} // '/dev/null';
    STDOUT->flush();
    STDERR->flush();
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        eval {
            POSIX::setpgid(0, 0);
            $SIG{$_} = 'DEFAULT' for qw(INT TERM QUIT HUP PIPE);
            open(STDIN, '<', '/dev/null') or die "stdin: $!\n";
            sysopen(my $fh, $log, O_WRONLY | O_CREAT | O_APPEND, 0600)
                or die "$log: $!\n";
            open(STDOUT, '>&', $fh) or die "stdout: $!\n";
            open(STDERR, '>&', $fh) or die "stderr: $!\n";
            $ENV{$_} = $o{env}->{$_} for keys %{ $o{env} // {} };
            chdir($o{cwd}) or die "chdir $o{cwd}: $!\n" if $o{cwd};
            exec { $argv->[0] } @$argv or die "cannot run $argv->[0]: $!\n";
        };
        print STDERR $@;
        POSIX::_exit(127);
    }
    POSIX::setpgid($pid, $pid);    # also here: no race with kill
    $self->{pids}->{$pid} = $argv->[0];
    return $pid;
}

# Waits for $pid to exit; returns its wait status.  A signal handler's
# die (vzdump's) goes through.
sub wait_exit {
    my ($self, $pid) = @_;
    while (1) {
        my $r = waitpid($pid, 0);
        if ($r == $pid) {
            delete $self->{pids}->{$pid};
            return $?;
        }
        die "waitpid $pid: $!\n" if $r == -1 && $! != EINTR;
    }
}

# Whether $pid has exited (and is reaped); its status in $self->{status}.
sub exited {
    my ($self, $pid) = @_;
    return 1 if !exists $self->{pids}->{$pid};
    if (waitpid($pid, WNOHANG) == $pid) {
        $self->{status}->{$pid} = $?;
        delete $self->{pids}->{$pid};
        return 1;
    }
    return 0;
}

# Stops $pid's process group: SIGTERM, then SIGKILL after the grace time;
# returns once the leader is reaped and no process of the group is left
# (or, should one not die even of SIGKILL, after another grace time).
# Also for a leader already reaped by wait_exit: what it left in its
# group goes too.
sub stop {
    my ($self, $pid) = @_;
    my $end = time() + $STOP_GRACE;
    my $killed = 0;
    kill('TERM', -$pid);
    while (!$self->exited($pid) || kill(0, -$pid)) {
        if (time() > $end) {
            return $self->{status}->{$pid} if $killed++;
            kill('KILL', -$pid);
            $end = time() + $STOP_GRACE;
        }
        sleep(0.05);
    }
    return $self->{status}->{$pid};
}

# Stops everything still running that was started through $self.
sub stop_all {
    my ($self) = @_;
    $self->stop($_) for sort { $b <=> $a } keys %{ $self->{pids} };
}

# Waits until $file exists and is not empty (a pid file), or dies when
# $pid exits first or $timeout seconds pass.
sub wait_for_file {
    my ($self, $file, $pid, $timeout, $what) = @_;
    my $end = time() + $timeout;
    while (!-s $file) {
        die "$what exited before it was ready\n" if $self->exited($pid);
        die "$what was not ready after $timeout s\n" if time() > $end;
        sleep(0.02);
    }
}

# Runs @$argv to its end; returns (wait status, stdout).  stderr goes to
# $o{log} if given.
sub run {
    my ($self, $argv, %o) = @_;
    pipe(my $r, my $w) or die "pipe: $!\n";
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        eval {
            POSIX::setpgid(0, 0);
            $SIG{$_} = 'DEFAULT' for qw(INT TERM QUIT HUP PIPE);
            close($r);
            open(STDIN, '<', '/dev/null') or die "stdin: $!\n";
            open(STDOUT, '>&', $w) or die "stdout: $!\n";
            if ($o{log}) {
                sysopen(my $fh, $o{log}, O_WRONLY | O_CREAT | O_APPEND, 0600)
                    or die "$o{log}: $!\n";
                open(STDERR, '>&', $fh) or die "stderr: $!\n";
            }
            exec { $argv->[0] } @$argv or die "cannot run $argv->[0]: $!\n";
        };
        print STDERR $@;
        POSIX::_exit(127);
    }
    POSIX::setpgid($pid, $pid);
    $self->{pids}->{$pid} = $argv->[0];
    close($w);
    my $out = do { local $/; <$r> } // '';
    close($r);
    return ($self->wait_exit($pid), $out);
}

# The last $n lines of $file, for error messages.
sub tail_of {
    my ($file, $n) = @_;
    open(my $fh, '<', $file) or return '';
    my @lines = <$fh>;
    close($fh);
    my $from = @lines > ($n // 5) ? @lines - ($n // 5) : 0;
    my $text = join('', @lines[$from .. $#lines]);
    $text =~ s/\s+\z//;
    return $text;
}

# "exit N" or "signal N" for a wait status.
sub describe_status {
    my ($status) = @_;
    return 'signal ' . ($status & 127) if $status & 127;
    return 'exit ' . ($status >> 8);
}

1;
