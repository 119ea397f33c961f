"""Layer 5: a new root holding only what the worker needs, read-only.

Inside the worker's private mount namespace the bootstrap builds a tmpfs root
and bind-mounts into it, at their own paths, read-only, nosuid and nodev: the
system library dirs (/usr and the /lib, /bin links), what the interpreter
needs (its executable and shared library, the standard library, the project's
environment with its site-packages), the secure_runner package, the
base-class paths and the submission. Not the base installation as a whole:
the global site-packages / dist-packages of the base interpreter and of the
system's Pythons (under the bound /usr) are covered with empty read-only
tmpfs unless this interpreter imports from them. /tmp is a fresh size-capped
tmpfs owned by the worker's uid (its only writable place), /proc is a new
procfs of the worker's PID namespace with hidepid=2, whose host-wide load
files are covered with synthetic read-only ones (PROC_MASKS: zero counters,
boot time 0, the worker's own memory limit as the machine's memory), /dev
has null, zero, full, random and urandom, and /etc holds only generated
passwd, group, hosts and nsswitch files plus the dynamic loader's cache and
the local time zone. Then pivot_root and detach the old root: no other path
of the host exists any more, so the interpreter under a 0700 /root stays
readable after the uid drop without changing the host.

Sources are opened (O_PATH) before anything is mounted, so a submission
living under the host's /tmp is still found once /tmp is covered.
"""

from __future__ import annotations

import glob
import os
import stat
import sys
import sysconfig

from secure_runner.runner.sandbox import syscalls

BUILD_AT = "/tmp"  # the new root is mounted here first (only inside our own mount namespace)
OLD_ROOT = "/.old-root"
SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("null", "zero", "full", "random", "urandom")
READ_ONLY = syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV
PROC_OPTIONS = "hidepid=2"
# Host-wide /proc files covered with synthetic ones: they show how busy the machine (other models) is.
PROC_MASKS = ("/proc/stat", "/proc/loadavg", "/proc/uptime", "/proc/meminfo")
SITE_PACKAGES = ("lib*/python3*/site-packages", "lib*/python3*/dist-packages")
MASK_OPTIONS = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC


def python_paths() -> list[str]:
    """What this interpreter runs from: its executable and shared library, sys.path dirs (standard
    library, the environment's site-packages), the environment's prefix, the secure_runner package."""
    import secure_runner

    candidates = {os.path.realpath(sys.executable), *sys.path, os.path.dirname(os.path.abspath(secure_runner.__file__))}
    if sys.prefix != sys.base_prefix:  # a virtual environment: pyvenv.cfg, its bin links
        candidates.add(sys.prefix)
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        candidates.add(os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")))
    return [p for p in candidates if p and os.path.exists(p)]


def unused_site_packages() -> list[str]:
    """Global site-packages of the base interpreter and the system's Pythons that this one does not import from."""
    found = set()
    for prefix in {sys.base_prefix, sys.base_exec_prefix, "/usr", "/usr/local"}:
        for pattern in SITE_PACKAGES:
            found.update(os.path.realpath(p) for p in glob.glob(os.path.join(prefix, pattern)))
    used = [os.path.realpath(p) for p in python_paths()]
    return sorted(p for p in found if not any(u == p or u.startswith(p + "/") for u in used))


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


def _proc_texts(memory_bytes: int) -> dict[str, str]:
    """The synthetic PROC_MASKS: as many CPUs as the host (CPU counting works), no counter of its use."""
    with open("/proc/stat") as host:
        cpus = [line.split()[0] for line in host if line.startswith("cpu")]
    kib = memory_bytes >> 10
    memory = {"MemTotal": kib, "MemFree": kib, "MemAvailable": kib, "Buffers": 0, "Cached": 0,
              "SwapTotal": 0, "SwapFree": 0}
    return {
        "/proc/stat": "".join(f"{cpu} {' '.join(['0'] * 10)}\n" for cpu in cpus)
        + "intr 0\nctxt 0\nbtime 0\nprocesses 0\nprocs_running 1\nprocs_blocked 0\nsoftirq 0\n",
        "/proc/loadavg": "0.00 0.00 0.00 1/1 1\n",
        "/proc/uptime": "0.00 0.00\n",
        "/proc/meminfo": "".join(f"{key + ':':<16}{value:>8} kB\n" for key, value in memory.items()),
    }


def _mask_proc(root: str, memory_bytes: int) -> None:
    """Cover PROC_MASKS with read-only binds of files generated on a tmpfs of their own, then detached
    (the binds keep it; unlinking the files instead would keep the root from going read-only)."""
    staging = root + "/.proc-masks"
    os.mkdir(staging, 0o755)
    syscalls.mount("tmpfs", staging, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0755,size=64k")
    for path, text in _proc_texts(memory_bytes).items():
        source = f"{staging}/{os.path.basename(path)}"
        _write(source, text)
        os.chmod(source, 0o444)
        fd = os.open(source, os.O_PATH | os.O_CLOEXEC)
        try:
            _bind(fd, root + path)
        finally:
            os.close(fd)
    syscalls.umount2(staging, syscalls.MNT_DETACH)
    os.rmdir(staging)


def _mask_site_packages(root: str, hidden: list[str], read_only: list[str]) -> int:
    """Cover each unused global site-packages that a bound tree shows with an empty read-only tmpfs."""
    masked = 0
    for path in hidden:
        if os.path.isdir(root + path) and not any(r == path or r.startswith(path + "/") for r in read_only):
            syscalls.mount("tmpfs", root + path, "tmpfs", MASK_OPTIONS, "size=4k,mode=0555")
            masked += 1
    return masked


def apply(read_only: list[str], tmp_bytes: int, uid: int, memory_bytes: int) -> str:
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    links = {p: os.readlink(p) for p in (*SYSTEM_PATHS, *ETC_FILES) if os.path.islink(p)}
    wanted = [p for p in (*SYSTEM_PATHS, *ETC_FILES, *(f"/dev/{d}" for d in DEVICES)) if p not in links]
    hidden = unused_site_packages()
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
        _mask_proc(root, memory_bytes)
        _etc(root, uid)
        _dev(root, opened)
        for path, target in links.items():
            os.symlink(target, root + path)
        for path in [p for p in opened if not p.startswith("/dev/")]:
            _bind(opened[path], root + path)
        masked = _mask_site_packages(root, hidden, read_only)
        os.makedirs(root + OLD_ROOT)
        syscalls.pivot_root(root, root + OLD_ROOT)
    finally:
        for fd in opened.values():
            os.close(fd)
    os.chdir("/")
    syscalls.umount2(OLD_ROOT, syscalls.MNT_DETACH)
    os.rmdir(OLD_ROOT)
    syscalls.mount(None, "/", None, syscalls.MS_REMOUNT | syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV)
    return (f"new root with {len(read_only)} read-only trees ({masked} global site-packages hidden), private /tmp "
            f"of {tmp_bytes >> 20} MiB, /proc hidepid=2 with {len(PROC_MASKS)} host-wide files masked")


def verify(submission: str) -> str:
    if os.path.exists("/etc/shadow") or os.path.exists(OLD_ROOT):
        raise OSError("host files still visible")
    visible = [p for p in unused_site_packages() if os.path.isdir(p) and os.listdir(p)]
    if visible:
        raise OSError(f"a global site-packages is visible: {visible[0]}")
    with open("/proc/loadavg") as loadavg:
        if not loadavg.read().startswith("0.00 0.00 0.00 "):
            raise OSError("/proc/loadavg shows the host's load")
    try:
        os.close(os.open(os.path.join(submission, ".write-probe"), os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError:
        pass
    else:
        raise OSError("the submission folder is writable")
    return "/etc/shadow absent; submission folder read-only; no global site-packages; /proc/loadavg synthetic"
