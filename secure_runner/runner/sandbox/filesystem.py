"""Layer 5: a new root holding only what the worker needs, read-only.

Inside the worker's private mount namespace the bootstrap builds a tmpfs root
and bind-mounts into it, at their own paths, read-only, nosuid and nodev: the
system library dirs (/usr and the /lib, /bin links), the Python installation
and site-packages, the secure_runner package, the base-class paths and the
submission. /tmp is a fresh size-capped tmpfs owned by the worker's uid (its
only writable place), /proc is a new procfs with hidepid=2 (other users'
processes are invisible), /dev has null, zero, full, random and urandom, and
/etc holds only generated passwd, group, hosts and nsswitch files plus the
dynamic loader's cache and the local time zone. Then pivot_root and detach the old root: no other
path of the host exists any more, so the interpreter under a 0700 /root stays
readable after the uid drop without changing the host.

Sources are opened (O_PATH) before anything is mounted, so a submission
living under the host's /tmp is still found once /tmp is covered.
"""

from __future__ import annotations

import os
import stat
import sys

from secure_runner.runner.sandbox import syscalls

BUILD_AT = "/tmp"  # the new root is mounted here first (only inside our own mount namespace)
OLD_ROOT = "/.old-root"
SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("null", "zero", "full", "random", "urandom")
READ_ONLY = syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV
PROC_OPTIONS = "hidepid=2"


def python_paths() -> list[str]:
    """Everything this interpreter imports from: prefixes, sys.path dirs, the secure_runner package."""
    import secure_runner

    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path}
    candidates.add(os.path.dirname(os.path.abspath(secure_runner.__file__)))
    return [p for p in candidates if p and os.path.exists(p)]


def system_paths() -> list[str]:
    """The system library and program dirs that are real directories here (others are links into /usr)."""
    return [p for p in SYSTEM_PATHS if os.path.isdir(p) and not os.path.islink(p)]


def minimal(paths: list[str]) -> list[str]:
    """Real paths, without those already inside another listed path or a system dir."""
    kept: list[str] = []
    for path in sorted({os.path.realpath(p) for p in paths}, key=len):
        covers = [*kept, *system_paths()]
        if not any(path == c or path.startswith(c.rstrip("/") + "/") for c in covers):
            kept.append(path)
    return kept


def _make_target(path: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(path, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _bind(fd: int, target: str, remount: int | None = READ_ONLY) -> None:
    _make_target(target, stat.S_ISDIR(os.fstat(fd).st_mode))
    syscalls.mount(f"/proc/self/fd/{fd}", target, None, syscalls.MS_BIND | syscalls.MS_REC)
    if remount is not None:
        syscalls.mount(None, target, None, remount)


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _etc(root: str, uid: int) -> None:
    os.makedirs(root + "/etc", mode=0o755)
    _write(root + "/etc/passwd", f"root:x:0:0::/:/usr/sbin/nologin\nsandbox:x:{uid}:{uid}::/tmp:/usr/sbin/nologin\n")
    _write(root + "/etc/group", f"root:x:0:\nsandbox:x:{uid}:\n")
    _write(root + "/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n")
    _write(root + "/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n")


def _dev(root: str, opened: dict[str, int]) -> None:
    os.makedirs(root + "/dev", mode=0o755)
    for name in DEVICES:
        if f"/dev/{name}" in opened:
            _bind(opened[f"/dev/{name}"], f"{root}/dev/{name}", remount=None)  # keeps /dev's own flags
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("shm", "/tmp")):
        os.symlink(target, f"{root}/dev/{link}")


def apply(read_only: list[str], tmp_bytes: int, uid: int) -> str:
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    links = {p: os.readlink(p) for p in (*SYSTEM_PATHS, *ETC_FILES) if os.path.islink(p)}
    wanted = [p for p in (*SYSTEM_PATHS, *ETC_FILES, *(f"/dev/{d}" for d in DEVICES)) if p not in links]
    opened = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in [*wanted, *read_only] if os.path.exists(p)}
    try:
        root = BUILD_AT
        syscalls.mount("tmpfs", root, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0755,size=4m")
        os.makedirs(root + "/tmp")
        syscalls.mount("tmpfs", root + "/tmp", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV,
                       f"mode=0700,uid={uid},gid={uid},size={tmp_bytes}")
        os.makedirs(root + "/proc")
        syscalls.mount("proc", root + "/proc", "proc",
                       syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC, PROC_OPTIONS)
        _etc(root, uid)
        _dev(root, opened)
        for path, target in links.items():
            os.symlink(target, root + path)
        for path in [p for p in opened if not p.startswith("/dev/")]:
            _bind(opened[path], root + path)
        os.makedirs(root + OLD_ROOT)
        syscalls.pivot_root(root, root + OLD_ROOT)
    finally:
        for fd in opened.values():
            os.close(fd)
    os.chdir("/")
    syscalls.umount2(OLD_ROOT, syscalls.MNT_DETACH)
    os.rmdir(OLD_ROOT)
    syscalls.mount(None, "/", None, syscalls.MS_REMOUNT | syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV)
    return f"new root with {len(read_only)} read-only trees, private /tmp of {tmp_bytes >> 20} MiB, /proc hidepid=2"


def verify(submission: str) -> str:
    if os.path.exists("/etc/shadow") or os.path.exists(OLD_ROOT):
        raise OSError("host files still visible")
    try:
        os.close(os.open(os.path.join(submission, ".write-probe"), os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError:
        pass
    else:
        raise OSError("the submission folder is writable")
    return "/etc/shadow absent; submission folder read-only"
