"""Workers forked from a pre-imported, secret-free template process (one per runner).

Starting each worker as a fresh interpreter costs its imports (protobuf, the codec, the
sandbox bindings, numpy) in CPU time and in private memory, once per model. A runner
therefore starts one *template*: a worker like any other, `python -I -m
secure_runner.runner.worker` with the workers' fixed environment, a new session and no
descriptor but its control socket (its stdin) and stderr, whose first frame says
`TEMPLATE_REQUEST` instead of a configuration. It imports what every worker imports,
freezes the garbage collector's view of those objects (`gc.freeze`, so collections never
write to the pages the workers share copy-on-write) and then only forks.

The template never holds a key or any secret: it is a new interpreter exec'd by the runner
(never a fork of the runner, which holds its TLS key and runs threads), it gets no
configuration at all (no model id, no path; each worker reads its own on its own stdin
from the runner), and the only descriptors it ever receives are the new worker's.

Each worker is forked after the template's imports and before anything of its own:
it becomes a new session, keeps exactly the descriptors the runner handed over (at the
numbers the runner asked for, everything else closed) and runs the worker's `main` as a
fresh worker would: it reads its configuration, joins its cgroup and applies every sandbox
layer itself, reports them, and only then may load submission code. CPython reseeds the
`random` module in a forked child; a numpy global generator (if loaded) is reseeded here.

Exit statuses: the runner must stay the worker's parent (it waits for it with a pidfd and
wait4, and reads the CPU time and signal of its death). The template forks twice: the
intermediate makes a new PID namespace, forks the worker (pid 1 there) and exits, the
worker is reparented to the runner (a PR_SET_CHILD_SUBREAPER), and the template reports
the worker's pid only after it has reaped the intermediate, so the pid the runner gets
already names its own child. Born pid 1, such a worker needs no waiter process outside its
PID namespace (runner/sandbox/namespaces.py): one process per model, not two.

The template dies with the runner (PR_SET_PDEATHSIG); workers do not die with the
template. A template that dies or fails is replaced on the next start after a pause;
meanwhile workers start the plain way (`WorkerTemplate.popen` returns None), each time logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import gc
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from secure_runner.runner import ipc, lifetime
from secure_runner.runner.sandbox import syscalls
from secure_runner.runner.sandbox.environment import worker_environment

log = logging.getLogger(__name__)

# The first frame a template reads on its stdin, where a worker reads its configuration (JSON).
TEMPLATE_REQUEST = b"template"
WORKER_MODULE = "secure_runner.runner.worker"
PR_SET_CHILD_SUBREAPER = 36
PID = struct.Struct("<i")
MAX_FDS = 16
MAX_REQUEST_BYTES = 4096
# Requests sent ahead of their answers: the template forks back to back while the runner and the
# workers already forked wait for a CPU (on a busy host, one round trip per fork is what costs).
MAX_IN_FLIGHT = 32
SPAWN_TIMEOUT_SECONDS = 10.0
# After a template failed: start workers the plain way this long before trying a new template.
RETRY_TEMPLATE_SECONDS = 30.0
# Modules every worker loads, imported once in the template (each optional one if installed).
PRELOAD = ("secure_runner.runner.sandbox.bootstrap", "pwd", "sysconfig")
PRELOAD_IF_INSTALLED = ("numpy",)


# -- the template process ---------------------------------------------------------------------------


def serve(main: Callable[[], int]) -> int:
    """The template's loop (in `python -I -m secure_runner.runner.worker`): fork a worker per request.

    A request is a frame on the control socket (fd 0): the target descriptor numbers (JSON),
    the descriptors themselves attached to its header (SCM_RIGHTS). Requests may queue up;
    each gets its answer, in order: the worker's pid, or -1 if it could not be forked.
    """
    lifetime.die_with_parent(os.getppid())
    _preload()
    control = socket.socket(fileno=0)
    gc.collect()
    gc.freeze()  # the objects imported so far are never written by a collection: their pages stay shared
    while True:
        try:  # read exactly the header, then the body: the next request's descriptors stay with it
            header, fds, _flags, _address = socket.recv_fds(control, ipc.HEADER.size, MAX_FDS)
            message = ipc.read_exact(0, ipc.frame_length(header, MAX_REQUEST_BYTES)) if header else b""
        except (OSError, ipc.FrameError):
            return 0
        if not message:
            return 0  # the runner closed the socket
        try:
            targets = [int(n) for n in json.loads(message)]
            if threads_of_self() != 1:
                raise OSError("a thread runs in the template: forking is unsafe")
            pid = _fork_worker(main, dict(zip(targets, fds, strict=True)), control)
        except (ValueError, TypeError, OSError) as exc:
            print(f"template: cannot fork a worker: {exc}", file=sys.stderr)
            pid = -1
        for fd in fds:
            os.close(fd)
        control.sendall(PID.pack(pid))


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for name in PRELOAD_IF_INSTALLED:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    sys.modules["sysconfig"].get_paths()  # loads and caches the build's configuration (the filesystem layer reads it)


def threads_of_self() -> int:
    """OS threads of this process (forking is only safe single-threaded; a library could start one)."""
    return len(os.listdir("/proc/self/task"))


def _fork_worker(main: Callable[[], int], fds: dict[int, int], control: socket.socket) -> int:
    """Double fork: the worker is reparented to the runner before its pid is reported."""
    pid_read, pid_write = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        try:
            os.close(pid_read)
            with contextlib.suppress(OSError):  # unprivileged: the worker's namespaces layer reports it missing
                syscalls.unshare(syscalls.CLONE_NEWPID)  # the worker is born pid 1 of its own PID namespace
            worker = os.fork()
            if worker == 0:
                control.detach()  # its fd is closed below with the others; no object may close fd 0 later
                _become_worker(main, fds)
            os.write(pid_write, PID.pack(worker))
        finally:
            os._exit(0)
    os.close(pid_write)
    try:
        answer = ipc.read_exact(pid_read, PID.size)
    except ipc.PipeClosed:
        answer = PID.pack(-1)  # the intermediate could not fork
    finally:
        os.close(pid_read)
        os.waitpid(intermediate, 0)
    return PID.unpack(answer)[0]


def _become_worker(main: Callable[[], int], fds: dict[int, int]) -> None:
    """In the forked worker: own session, exactly the runner's descriptors, then the worker's main. Never returns."""
    code = 1
    try:
        os.setsid()
        _keep_only(fds)
        os.chdir("/")  # the worker changes to its submission once its sandbox is up
        numpy_random = sys.modules.get("numpy.random")
        if numpy_random is not None:  # CPython reseeds `random` at fork; numpy's global generator is ours to reseed
            numpy_random.seed()
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - what an uncaught exception does in a fresh worker
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _keep_only(fds: dict[int, int]) -> None:
    """Put each received descriptor at its target number and close every other one."""
    above = max([*fds, *fds.values(), 2]) + 1  # copies up here collide with no target and no source
    copies = {target: fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, above) for target, source in fds.items()}
    for target, copy in copies.items():
        os.dup2(copy, target)  # inheritable, like a descriptor Popen hands over
    for fd in set(range(above)) - set(fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    os.closerange(above, os.sysconf("SC_OPEN_MAX"))


# -- the runner's side ------------------------------------------------------------------------------


@dataclass
class ForkedWorker:
    """A worker forked by the template, seen like a `subprocess.Popen` with pipes (what the supervisor uses)."""

    pid: int
    stdin: BinaryIO
    stdout: BinaryIO
    stderr: BinaryIO
    returncode: int | None = None


class WorkerTemplate:
    """The runner's handle on its template: started on first use, replaced after a failure.

    Everything runs on the runner's event loop thread (the template dies with the thread
    that started it). Up to MAX_IN_FLIGHT requests are sent ahead; the answers come back in
    order, each resolving the oldest waiting request.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._stderr_task: asyncio.Task | None = None
        self._answers: collections.deque[asyncio.Future[int]] = collections.deque()
        self._received = bytearray()
        self._in_flight: asyncio.Semaphore | None = None
        self._retry_at = 0.0

    async def popen(self, pass_fds: tuple[int, ...] = ()) -> ForkedWorker | None:
        """A new worker with pipes as stdin, stdout and stderr (and `pass_fds` at the same numbers).

        None if the template is unavailable (logged): the caller starts the worker the plain way.
        """
        stdin_read, stdin_write = os.pipe2(os.O_CLOEXEC)
        stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
        stderr_read, stderr_write = os.pipe2(os.O_CLOEXEC)
        child_ends = {0: stdin_read, 1: stdout_write, 2: stderr_write} | {fd: fd for fd in pass_fds}
        try:
            pid = await self._fork(child_ends)
        finally:
            for fd in (stdin_read, stdout_write, stderr_write):
                os.close(fd)
        if pid is None:
            for fd in (stdin_write, stdout_read, stderr_read):
                os.close(fd)
            return None
        return ForkedWorker(pid, open(stdin_write, "wb"), open(stdout_read, "rb"), open(stderr_read, "rb"))

    async def _fork(self, child_ends: dict[int, int]) -> int | None:
        self._in_flight = self._in_flight or asyncio.Semaphore(MAX_IN_FLIGHT)
        async with self._in_flight:
            if time.monotonic() < self._retry_at:
                return None
            process, answer = None, asyncio.get_running_loop().create_future()
            try:
                if self._process is None or self._process.poll() is not None:
                    await self.close()
                    self._start()
                process = self._process
                request = json.dumps(list(child_ends)).encode()
                self._answers.append(answer)
                socket.send_fds(self._control, [ipc.encode_frame(request)], list(child_ends.values()))
                pid = await asyncio.wait_for(asyncio.shield(answer), SPAWN_TIMEOUT_SECONDS)
                if pid <= 0:
                    raise OSError("the template could not fork a worker")
                return pid
            except (OSError, TimeoutError) as exc:  # out of step, or gone: this template is done
                answer.cancel()  # nobody waits for it any more (and its error would be logged as never retrieved)
                if process in (None, self._process):  # not already replaced by another request
                    log.warning("worker template failed (%s): workers start without it for %.0f s",
                                str(exc) or type(exc).__name__, RETRY_TEMPLATE_SECONDS)
                    self._retry_at = time.monotonic() + RETRY_TEMPLATE_SECONDS
                    await self.close()
                return None

    def _start(self) -> None:
        syscalls.prctl(PR_SET_CHILD_SUBREAPER, 1)  # forked workers are reparented to this process
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-m", WORKER_MODULE],
                stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env=worker_environment(dict(os.environ)), cwd="/", start_new_session=True, close_fds=True,
            )
        ours.sendall(ipc.encode_frame(TEMPLATE_REQUEST))
        ours.setblocking(False)
        self._control = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable)
        self._stderr_task = asyncio.create_task(self._log_stderr(self._process))
        log.info("worker template started (pid %d)", self._process.pid)

    def _readable(self) -> None:
        """Answers (pids) from the template, in the order of the requests."""
        try:
            chunk = self._control.recv(PID.size * MAX_IN_FLIGHT)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._fail_waiting(OSError("the template closed its socket"))
            asyncio.get_running_loop().remove_reader(self._control.fileno())
            return
        self._received += chunk
        while len(self._received) >= PID.size and self._answers:
            (pid,) = PID.unpack_from(self._received)
            del self._received[:PID.size]
            answer = self._answers.popleft()
            if not answer.done():
                answer.set_result(pid)
        if self._received and not self._answers:
            self._fail_waiting(OSError("the template answered a request never made"))

    def _fail_waiting(self, error: OSError) -> None:
        while self._answers:
            answer = self._answers.popleft()
            if not answer.done():
                answer.set_exception(error)

    async def _log_stderr(self, process: subprocess.Popen) -> None:
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _protocol = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), process.stderr)
        try:
            while line := await reader.readline():
                log.warning("worker template: %s", line[:2000].decode(errors="replace").rstrip())
        finally:
            transport.close()

    async def close(self) -> None:
        """Stop the template (its workers live on: they are this process's children)."""
        process, self._process = self._process, None
        control, self._control = self._control, None
        stderr_task, self._stderr_task = self._stderr_task, None
        self._fail_waiting(OSError("the template was stopped"))
        self._received.clear()
        if control is not None:
            asyncio.get_running_loop().remove_reader(control.fileno())
            control.close()
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.to_thread(process.wait)
        if stderr_task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(stderr_task, 1.0)


async def reap_orphan(pid: int, wait_seconds: float = 1.0) -> None:
    """Reap `pid` once it is a zombie child of this process that lived in a nested PID namespace.

    With the runner a subreaper, a worker's pid-1 child that outlives its waiter by an
    instant (the runner kills both at once) is reparented here instead of to init. Only
    such a child is reaped: never a process whose exit status anyone waits for (a worker,
    the template, or anything else this process started lives in its PID namespace).
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            with open(f"/proc/{pid}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            return  # gone: its waiter reaped it
        if int(fields.get("PPid", "0")) != os.getpid() or len(fields.get("NSpid", "").split()) < 2:
            return
        if fields.get("State", "").split()[:1] == ["Z"]:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.01)
