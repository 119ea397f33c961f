"""Layer 4: new network, IPC, UTS, mount and cgroup namespaces.

The network namespace holds only its own loopback interface, brought up so
libraries that talk to localhost keep working while no host address (and no
abstract unix socket of the host) is reachable. Needs CAP_SYS_ADMIN (root).
"""

from __future__ import annotations

import fcntl
import socket
import struct
from pathlib import Path

from secure_runner.runner.sandbox import syscalls

HOSTNAME = "sandbox"
FLAGS = (
    syscalls.CLONE_NEWNET
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


def apply() -> str:
    syscalls.unshare(FLAGS)
    socket.sethostname(HOSTNAME)
    _loopback_up()
    return "net (lo only), ipc, uts, mount, cgroup"


def verify() -> str:
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    interfaces = [line.split(":")[0].strip() for line in lines]
    if interfaces != ["lo"] or socket.gethostname() != HOSTNAME:
        raise OSError(f"still sees interfaces {interfaces} / hostname {socket.gethostname()!r}")
    return "only interface: lo; hostname: sandbox"
