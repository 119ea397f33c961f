"""Layer 4: new PID, network, IPC, UTS, mount and cgroup namespaces.

The network namespace holds only its own loopback interface, brought up so
libraries that talk to localhost keep working while no host address (and no
abstract unix socket of the host) is reachable. Needs CAP_SYS_ADMIN (root).

A new PID namespace only takes effect for children. A worker forked from its
runner's template (runner/template.py) is already pid 1 of a new one: the
template's intermediate process made it (unshare CLONE_NEWPID) just before
forking the worker, and the worker itself makes the other namespaces here, with
no waiter (the runner is its parent, outside; it dies with the runner). A worker
started as a fresh interpreter makes them all and forks
here: the child becomes pid 1 of the new namespace and goes on to apply the
other layers and run the model; it sees no process outside (getppid() is 0,
the runner's pid names nothing). The parent, the process the runner started,
stays outside as a waiter running no submission code: it closes every
descriptor, waits for the child and then ends the same way (same
exit code, or killed by the same signal), so the runner's view is unchanged:
one pid whose exit status, process group and cgroup are the worker's, and
wait4's CPU time includes the child's. The child stays in the waiter's
process group (the runner kills the whole group) and dies with it
(PR_SET_PDEATHSIG, set again after the uid drop: changing credentials clears it).

As pid 1 of its namespace the worker only receives signals it handles from
inside (a model cannot kill itself with a default-action signal; SIGXCPU at
the soft CPU limit is ignored, the kernel's SIGKILL at the hard limit one
second later is not), orphans of its children are reparented to it, and when
it exits the kernel kills everything left in the namespace.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
from pathlib import Path

from secure_runner.runner.sandbox import syscalls

HOSTNAME = "sandbox"
FLAGS = (
    syscalls.CLONE_NEWPID
    | syscalls.CLONE_NEWNET
    | syscalls.CLONE_NEWIPC
    | syscalls.CLONE_NEWUTS
    | syscalls.CLONE_NEWNS
    | syscalls.CLONE_NEWCGROUP
)
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _wait_and_end_alike(child: int) -> None:
    """The waiter: hold no descriptor, outlive the child only to end as it did."""
    os.closerange(0, os.sysconf("SC_OPEN_MAX"))
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _pid, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        os._exit(128 + number)  # not reached: the signal's default action ends this process
    os._exit(os.waitstatus_to_exitcode(status))


def die_with_the_waiter() -> None:
    """Die when the parent dies (the waiter, or the runner for a worker that started as pid 1); again after the
    uid drop, which clears it."""
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)


def started_as_pid_one() -> bool:
    """Forked by its runner's template straight into a new PID namespace (runner/template.py): no waiter."""
    return os.getpid() == 1


def pid_outside() -> int:
    """This process's pid as the runner knows it (NSpid's first field in the mounted /proc: the host's, before
    the filesystem layer mounts the worker's own)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("NSpid:"):
                return int(line.split()[1])
    return os.getpid()


def apply() -> str:
    if started_as_pid_one():  # the other namespaces take effect at once: nothing to wait for, no waiter
        syscalls.unshare(FLAGS & ~syscalls.CLONE_NEWPID)
    else:
        syscalls.unshare(FLAGS)
        child = os.fork()
        if child:
            _wait_and_end_alike(child)  # never returns
    die_with_the_waiter()
    socket.sethostname(HOSTNAME)
    _loopback_up()
    return "pid (the worker is pid 1), net (lo only), ipc, uts, mount, cgroup"


def verify() -> str:
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    interfaces = [line.split(":")[0].strip() for line in lines]
    if interfaces != ["lo"] or socket.gethostname() != HOSTNAME:
        raise OSError(f"still sees interfaces {interfaces} / hostname {socket.gethostname()!r}")
    if os.getpid() != 1 or os.getppid() != 0:
        raise OSError(f"not alone in a PID namespace: pid {os.getpid()}, parent {os.getppid()}")
    return "only interface: lo; hostname: sandbox; pid 1, no parent visible"
