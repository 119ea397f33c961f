"""Layers 6 and 7: an unprivileged uid/gid, then no_new_privs.

The worker runs as uid = gid = uid_base + its pid (as the runner knows it), with no supplementary
groups and an empty capability bounding set, so even a setuid-root binary
(were one reachable) could not give back a capability. no_new_privs makes
setuid bits and file capabilities inert for the worker and all its children.
"""

from __future__ import annotations

import os
from pathlib import Path

from secure_runner.runner.sandbox import syscalls


def worker_uid(uid_base: int, host_pid: int) -> int:
    """Unique among live workers: `host_pid` is the worker's pid as the runner knows it."""
    return uid_base + host_pid


def _others_can_read(path: str, ancestors: bool) -> bool:
    """Can an arbitrary uid read `path` (o+r, and o+x for a dir), and reach it (ancestors o+x)?"""
    current = Path(path)
    mode = current.stat().st_mode
    if not mode & 0o004 or (current.is_dir() and not mode & 0o001):
        return False
    return not ancestors or all(part.stat().st_mode & 0o001 for part in current.parents)


def drop_uid(uid: int, needed: list[str], new_root: bool) -> str:
    """Switch to `uid`; `needed` must stay readable (in the new root only the bound trees' own modes count)."""
    if os.getuid() != 0:
        raise OSError(f"not started as root (uid {os.getuid()}): cannot switch to an unprivileged uid")
    unreadable = [p for p in needed if not _others_can_read(p, ancestors=not new_root)]
    if unreadable:
        why = "is not readable by other users" if new_root else "would be unreadable without the filesystem layer"
        raise OSError(f"{unreadable[0]} {why}: the worker's uid could not load it")
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    return f"uid/gid {uid}, no groups, no capabilities"


def verify_uid() -> str:
    status = dict(
        line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":\t" in line
    )
    ids = {*os.getresuid(), *os.getresgid(), *os.getgroups()}
    if 0 in ids or int(status["CapEff"], 16) or int(status["CapBnd"], 16):
        raise OSError(f"still privileged: ids {sorted(ids)}, CapEff {status['CapEff']}, CapBnd {status['CapBnd']}")
    return f"uid {os.getuid()}, no capabilities (effective or bounding)"


def no_new_privs() -> str:
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    return "set"


def verify_no_new_privs() -> str:
    if syscalls.prctl(syscalls.PR_GET_NO_NEW_PRIVS) != 1:
        raise OSError("no_new_privs is not set")
    return "set"
