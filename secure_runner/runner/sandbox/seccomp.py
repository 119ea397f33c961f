"""Layer 9: a seccomp deny-list (via the `pyseccomp` binding over libseccomp).

Allows by default and refuses, with EPERM: debugging other processes,
mounting and namespaces, kernel keyrings, BPF and perf, io_uring (its
operations bypass seccomp), kernel modules and kexec, clock and host
settings, inotify and fanotify (watches on the read-only trees would show
what other workers open), pidfds, clone() with a namespace flag and terminal
injection. clone3 gets ENOSYS (its flags live in memory seccomp cannot
read), so libc falls back to clone() and threads still start. System calls
of another architecture (int 0x80, x32) kill the process.

Sockets: a worker needs none it did not create as a connected pair, and
seccomp cannot read the address a connect() names, so socket() is refused
outright, as are connect, bind, listen and accept (a read-only mount and
Landlock do not stop a connect() to a pathname unix socket in a bound tree).
socketpair(AF_UNIX) still works for streams and packets (asyncio's self-pipe,
multiprocessing pipes) but not datagrams (SOCK_DGRAM, or SOCK_RAW, which unix
sockets turn into datagrams), which sendmsg() could address to a path;
sendto() with an address is refused too.

pyseccomp loads libseccomp when imported: the worker imports this module
before the filesystem layer replaces the root.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pyseccomp

from secure_runner.runner.sandbox import syscalls

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "lookup_dcookie",
    "inotify_init", "inotify_init1", "inotify_add_watch", "fanotify_init", "fanotify_mark",
    "pidfd_open", "pidfd_send_signal",
    "socket", "connect", "bind", "listen", "accept", "accept4",
    "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm", "uselib",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "migrate_pages", "move_pages", "vhangup",
)
# Newer than this libseccomp's tables: the same number on every architecture since Linux 5.1.
DENIED_BY_NUMBER = {"statmount": 457, "listmount": 458, "open_tree_attr": 467}
NAMESPACE_FLAGS = (
    syscalls.CLONE_NEWNS, syscalls.CLONE_NEWCGROUP, syscalls.CLONE_NEWUTS, syscalls.CLONE_NEWIPC,
    syscalls.CLONE_NEWUSER, syscalls.CLONE_NEWPID, syscalls.CLONE_NEWNET,
)
TIOCSTI = 0x5412
SOCKET_TYPE_MASK = 0xF  # the type argument without SOCK_NONBLOCK / SOCK_CLOEXEC


def _known(name: str) -> bool:
    return pyseccomp.resolve_syscall(pyseccomp.system_arch(), name) >= 0


def apply() -> str:
    deny = pyseccomp.ERRNO(errno.EPERM)
    rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    rules.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    names = [n for n in DENIED if _known(n)]
    for name in names:
        rules.add_rule(deny, name)
    for name, number in DENIED_BY_NUMBER.items():
        rules.add_rule(deny, pyseccomp.resolve_syscall(pyseccomp.system_arch(), name) if _known(name) else number)
    rules.add_rule(deny, "socketpair", pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX))
    for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        rules.add_rule(deny, "socketpair", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, SOCKET_TYPE_MASK, kind))
    rules.add_rule(deny, "sendto", pyseccomp.Arg(4, pyseccomp.NE, 0))
    for flag in NAMESPACE_FLAGS:
        rules.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    rules.add_rule(deny, "ioctl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, 0xFFFFFFFF, TIOCSTI))
    rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    rules.load()
    unknown = sorted(set(DENIED) - set(names))
    detail = (f"{len(names) + len(DENIED_BY_NUMBER)} system calls denied (socket, connect, bind, inotify, "
              "pidfd_open, ...), stream socket pairs only, clone3 ENOSYS")
    return detail + (f" (unknown to libseccomp here: {', '.join(unknown)})" if unknown else "")


def verify() -> str:
    status = Path("/proc/self/status").read_text()
    if "Seccomp:\t2" not in status:
        raise OSError("no seccomp filter in force")
    for family in (socket.AF_INET, socket.AF_UNIX):
        try:
            socket.socket(family, socket.SOCK_STREAM).close()
        except PermissionError:
            continue
        raise OSError(f"a {family.name} socket was allowed")
    left, right = socket.socketpair()
    left.close()
    right.close()
    return "filter mode 2; AF_INET and AF_UNIX sockets are refused, a stream socket pair works"
