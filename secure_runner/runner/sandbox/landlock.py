"""Layer 8: Landlock (via the `landlockpy` binding).

Filesystem: read (and execute) only the read-only trees and a few files,
read-write only the private /tmp and /dev/null, nothing else, even for paths
the uid could otherwise open. In its own /proc/<pid> the worker may list
everything but read only the entries that describe itself, not those that
describe its mounts (mountinfo, mounts, mountstats: they name host paths,
devices and filesystem options) nor those under task/ (each thread's copy of
them). Network (ABI >= 4): no TCP bind or connect at
all. Scopes (ABI >= 6): no abstract unix socket and no signal outside the
worker's own domain. Rights the running kernel lacks are reported, not
silently dropped.
"""

from __future__ import annotations

import os

import landlockpy
from landlockpy import AccessFS, AccessNet, Scope

from secure_runner.runner.sandbox import filesystem

READ_DIR = AccessFS.READ_FILE | AccessFS.READ_DIR | AccessFS.EXECUTE
READ_FILE = AccessFS.READ_FILE | AccessFS.EXECUTE
DEVICE = AccessFS.READ_FILE | AccessFS.WRITE_FILE
# What the new root holds besides the read-only trees (filesystem.py), so both lists change together.
HOST_FILES = (*filesystem.ETC_FILES, "/etc/passwd", "/etc/group", "/etc/hosts", "/etc/nsswitch.conf",
              "/proc/cpuinfo", *filesystem.PROC_MASKS)
# Entries of /proc/<pid> that stay unreadable: they show the mounts (host paths, disks), or hold them per thread.
PROC_PRIVATE = ("mountinfo", "mounts", "mountstats", "task")
DEVICES = tuple(f"/dev/{name}" for name in filesystem.DEVICES)
TCP = AccessNet.BIND_TCP | AccessNet.CONNECT_TCP
SCOPES = Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL


def _kernel_abi() -> int | str:
    try:
        return landlockpy.abi_version()
    except Exception as exc:  # noqa: BLE001 - ENOSYS, EOPNOTSUPP (disabled at boot), no libc...
        return f"{type(exc).__name__}: {exc}"


# Asked at import, in the worker before the root changes: it also makes the binding load libc.
KERNEL_ABI = _kernel_abi()


def _allow_own_proc(ruleset: landlockpy.Ruleset) -> None:
    """List /proc/self; read its entries but PROC_PRIVATE. Links are skipped (a rule follows them: root is /).

    Named as the mounted procfs names this process (not getpid(): without the filesystem layer
    /proc is the host's, where pid 1 is the host's init, not this worker)."""
    own = f"/proc/{os.readlink('/proc/self')}"
    ruleset.allow_path(own, AccessFS.READ_DIR)
    for name in os.listdir(own):
        path = f"{own}/{name}"
        if name not in PROC_PRIVATE and not os.path.islink(path):
            ruleset.allow_path(path, READ_DIR if os.path.isdir(path) else AccessFS.READ_FILE)


def apply(read_only: list[str], writable: str) -> str:
    if isinstance(KERNEL_ABI, str):
        raise OSError(f"Landlock unavailable: {KERNEL_ABI}")
    version = KERNEL_ABI
    handled_fs = landlockpy.fs_for_abi(version)
    tmp_rights = handled_fs & ~(AccessFS.MAKE_CHAR | AccessFS.MAKE_BLOCK | AccessFS.IOCTL_DEV)
    with landlockpy.Ruleset(handled_fs=handled_fs, handled_net=TCP, scoped=SCOPES) as ruleset:
        for path in read_only:
            ruleset.allow_path(path, READ_DIR if os.path.isdir(path) else READ_FILE)
        for path in HOST_FILES:
            if os.path.exists(path):
                ruleset.allow_path(path, READ_DIR if os.path.isdir(path) else READ_FILE)
        _allow_own_proc(ruleset)
        for path in DEVICES:
            if os.path.exists(path):
                ruleset.allow_path(path, DEVICE)
        ruleset.allow_path(writable, tmp_rights)
        ruleset.restrict(no_new_privs=False)  # already set by its own layer
        net, scoped = ruleset.handled_net, ruleset.scoped
    lacking = [name for name, ok in (("TCP rules (ABI 4)", net == TCP), ("scopes (ABI 6)", scoped == SCOPES)) if not ok]
    detail = f"ABI {version}: read-only allowlist of {len(read_only)} trees, writable {writable}"
    detail += ", no TCP, no outside abstract sockets or signals" if not lacking else f"; kernel lacks {', '.join(lacking)}"
    return detail


def verify(read_only: list[str]) -> str:
    outside = "/"
    if outside in read_only:
        raise OSError("the root directory is on the allowlist")
    try:
        os.listdir(outside)
    except PermissionError:
        pass
    else:
        raise OSError("listing / is still allowed")
    try:
        open("/proc/self/mountinfo").close()
    except PermissionError:
        return "listing / and reading /proc/self/mountinfo are refused"
    raise OSError("/proc/self/mountinfo is readable")
