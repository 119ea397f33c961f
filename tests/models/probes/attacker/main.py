"""A malicious submission: each call of `echo({"probe": NAME, ...})` tries one escape.

Every probe reports what happened (`{"done": ...}` or `{"error": "Type: message"}`)
so the test can assert the attempt was stopped; some (memory, CPU, fork bomb)
are stopped by killing the worker instead, and the call comes back FAILURE.
`echo(anything else)` is the good call that must still work afterwards.
"""

import ctypes
import os
import signal
import socket
import subprocess
import time

from sr_testgame.base import GameBase

libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
CLONE_NEWUSER = 0x10000000


def _errno_result(result):
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def tcp_connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.sendall(b"hello from the sandbox")
    return "connected"


def dns(name):
    return socket.getaddrinfo(name, 80)[0][4][0]


def unix_path(path):
    """Connect to a pathname unix socket the host placed in a tree bound into the sandbox."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(2)
        conn.connect(path)
        conn.sendall(b"hello from the sandbox")
    return "connected"


def unix_path_datagram(path, kind):
    """Send to a pathname datagram socket without connect(): from a socket pair of `kind`
    (SOCK_DGRAM, or SOCK_RAW: a unix socket makes it a datagram one), with sendto() or sendmsg()."""
    mine, _other = socket.socketpair(socket.AF_UNIX, getattr(socket, kind))
    with mine, _other:
        mine.sendmsg([b"hello from the sandbox"], [], 0, path)
        return mine.sendto(b"hello again", path)


def inotify():
    """Watch the shared read-only trees for what other workers open."""
    fd = _errno_result(libc.inotify_init1(0))
    os.close(fd)
    return "watching"


def _outcome(action):
    try:
        result = action()
    except OSError as exc:
        return type(exc).__name__
    return "allowed" if result is None else f"allowed: {result}"


def pid_view(runner_pid):
    """What the worker can learn about (and do to) processes outside its own."""
    alive = [pid for pid in range(1, 1 << 16) if _outcome(lambda pid=pid: os.kill(pid, 0)) != "ProcessLookupError"]
    return {
        "ppid": os.getppid(),
        "signal_runner": _outcome(lambda: os.kill(runner_pid, 0)),
        "pidfd_runner": _outcome(lambda: os.close(os.pidfd_open(runner_pid))),
        "visible_pids": len(alive),
    }


def proc_files(*paths):
    """Each file's text, or the error that stopped reading it."""
    found = {}
    for path in paths:
        try:
            with open(path) as handle:
                found[path] = handle.read()
        except OSError as exc:
            found[path] = f"{type(exc).__name__}"
    return found


def listdir(path):
    return sorted(os.listdir(path))


def abstract_unix(name):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(2)
        conn.connect("\0" + name)
        conn.sendall(b"hello from the sandbox")
    return "connected"


def read(path):
    with open(path, "rb") as handle:
        return handle.read(200).hex()


def write(path):
    with open(path, "w") as handle:
        handle.write("written by the sandbox")
    return "written"


def exec_setuid(path):
    return subprocess.run([path, "-u"], capture_output=True, text=True, timeout=10).stdout.strip()


def signal_runner(runner_pid):
    os.kill(runner_pid, signal.SIGTERM)
    return "signalled"


def ptrace_runner(runner_pid):
    return _errno_result(libc.ptrace(PTRACE_ATTACH, runner_pid, None, None))


def user_namespace():
    return _errno_result(libc.unshare(CLONE_NEWUSER))


def allocate(gib):
    block = b"x" * (gib << 30)  # writes every page
    return len(block)


def spin_ignoring_sigxcpu():
    signal.signal(signal.SIGXCPU, signal.SIG_IGN)
    while True:
        pass


def fork_bomb(seconds):
    """Every process forks as fast as it can for `seconds`; the parent reports the failures it saw."""
    me, failures, forked = os.getpid(), 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if os.fork() == 0:
                continue  # the child joins the bomb
            forked += 1
        except OSError as exc:
            failures += 1
            last = f"{type(exc).__name__}: {exc}"
    if os.getpid() != me:
        os._exit(0)
    while True:  # reap what is left
        try:
            os.wait()
        except ChildProcessError:
            break
    return {"forked": forked, "failures": failures, "last": last if failures else ""}


def temp_file():
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "scratch.txt")
    with open(path, "w") as handle:
        handle.write("scratch")
    with open(path) as handle:
        return handle.read()


PROBES = {name: f for name, f in globals().items() if callable(f) and not name.startswith("_") and name != "GameBase"}


class Attacker(GameBase):
    def echo(self, value):
        if not isinstance(value, dict) or "probe" not in value:
            return value  # the good call
        probe = PROBES[value["probe"]]
        if value.get("raise"):
            return {"done": probe(*value.get("args", []))}
        try:
            return {"done": probe(*value.get("args", []))}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    def count(self):
        return 0

    def hang(self, seconds):
        time.sleep(seconds)

    def fail(self, message):
        raise RuntimeError(message)
