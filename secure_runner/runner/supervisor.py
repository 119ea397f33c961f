"""Supervision of one model's worker subprocess.

A `ModelHost` owns one worker at a time and serializes requests to it (a model
instance is stateful and single-threaded). It enforces every deadline itself:
a call that overruns is answered TIMEOUT at once, the worker's whole process
group is killed, and a fresh worker is started and given the model's last
Setup again before the next request is served. Health goes NOT_SERVING from
the kill until the new worker is set up. A worker that dies, or breaks the
framing, is treated the same way and reported with its precise cause:
MEMORY_LIMIT (its cgroup's OOM killer), CPU_LIMIT (RLIMIT_CPU, read from the
exit signal and the CPU time wait4 reports), WORKER_CRASHED (anything else,
with the exit code or signal) or SANDBOX_UNAVAILABLE (a required layer could
not be applied). Restarts back off exponentially while a model keeps failing,
so a crash-looping model cannot spin the CPU; the runner itself never dies of
a worker.

Each worker is started with `subprocess.Popen` (no preexec_fn: the runner is
threaded), gets its own cgroup (made here, joined by the worker) and reports
the sandbox layers in force in its first frame before it may load any code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from secure_runner.errors import ErrorCode, RequestError, SecureRunnerError
from secure_runner.runner import ipc
from secure_runner.runner.sandbox import cgroups
from secure_runner.runner.sandbox.environment import worker_environment
from secure_runner.runner.sandbox.policy import LAYERS, LayerResult, SandboxPolicy, scratch_dir
from secure_runner.runner.worker import SANDBOX_EXIT_CODE, WorkerConfig, WorkerLimits
from secure_runner.v1 import runner_pb2, values_pb2, worker_pb2

log = logging.getLogger(__name__)

FAILURE = runner_pb2.CALL_STATUS_FAILURE
TIMEOUT = runner_pb2.CALL_STATUS_TIMEOUT
SUCCESS = runner_pb2.CALL_STATUS_SUCCESS
MAX_LOG_LINE = 2000
EXIT_STATUS_WAIT_SECONDS = 1.0
HELLO_TIMEOUT_SECONDS = 30.0
MAX_HELLO_BYTES = 64 * 1024
# Restart delays after consecutive failures: none for the first, then doubling up to the cap.
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0


class WorkerGone(SecureRunnerError):
    """The worker exited, closed its pipe, broke the framing rules or refused to start."""


def failure_response(code: ErrorCode, message: str, status: int = FAILURE) -> runner_pb2.CallResponse:
    """A call's answer when the model gave none: the status (FAILURE or TIMEOUT) and why."""
    return runner_pb2.CallResponse(status=status, error=values_pb2.ErrorDetail(code=code, message=message))


def _gone(exc: WorkerGone) -> runner_pb2.CallResponse:
    return failure_response(exc.code, exc.message, TIMEOUT if exc.code == ErrorCode.MODEL_TIMEOUT else FAILURE)


def backoff_seconds(failures: int) -> float:
    """Delay before the next start after `failures` consecutive failures."""
    if failures <= 1:
        return 0.0
    return min(BACKOFF_FIRST_SECONDS * 2 ** (failures - 2), BACKOFF_MAX_SECONDS)


@dataclass(frozen=True)
class WorkerCall:
    """A call as a worker receives it: its method (checked by the host) and its frame, encoded once.

    The frame carries no model id (a worker hosts one model), so a fan-out encodes its
    arguments once and sends the same bytes to every model that shares them.
    """

    method: str
    frame: bytes

    @classmethod
    def encode(cls, method: str, arguments, kwargs) -> WorkerCall:
        call = runner_pb2.CallRequest(method=method, arguments=arguments, kwargs=kwargs)
        return cls(method, _worker_frame(worker_pb2.WorkerRequest(call=call)))


def _worker_frame(request: worker_pb2.WorkerRequest) -> bytes:
    return ipc.encode_frame(request.SerializeToString())


@dataclass(frozen=True)
class Exit:
    returncode: int
    cpu_seconds: float  # user + system time of the worker, from wait4


def _describe(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class WorkerProcess:
    """One live worker subprocess, its framed pipes, its cgroup and its exit status."""

    def __init__(self, model_id: str, popen: subprocess.Popen, config: WorkerConfig,
                 cgroup: cgroups.WorkerCgroup | None) -> None:
        self.model_id = model_id
        self.popen = popen
        self.config = config
        self.cgroup = cgroup
        self.layers: list[LayerResult] = []
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[Exit] = loop.create_future()
        self._pidfd = os.pidfd_open(popen.pid)
        loop.add_reader(self._pidfd, self._reap)
        self._pipes: ipc.FrameChannel | None = None  # the protocol: the worker's stdin and stdout
        self._stderr: asyncio.BaseTransport | None = None
        self._stderr_task: asyncio.Task | None = None

    @classmethod
    async def spawn(cls, model_id: str, config: WorkerConfig) -> WorkerProcess:
        cgroup, error = None, ""
        try:
            cgroup = cgroups.WorkerCgroup.create(model_id, config.limits)
        except (cgroups.CgroupUnavailable, OSError, ValueError) as exc:  # reported as a missing layer
            error = str(exc)
        config = replace(config, cgroup_procs=cgroup.procs_files if cgroup else [], cgroup_error=error)
        try:
            popen = subprocess.Popen(
                [sys.executable, "-I", "-m", "secure_runner.runner.worker", config.to_json()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=worker_environment(dict(os.environ)),
                cwd=config.submission,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            if cgroup:
                cgroup.remove()
            raise WorkerGone(ErrorCode.WORKER_CRASHED, f"cannot start a worker: {exc}") from None
        process = cls(model_id, popen, config, cgroup)
        await process.or_close(process._connect(), ErrorCode.WORKER_CRASHED, "worker did not report its sandbox in time")
        return process

    async def or_close(self, awaitable, code: ErrorCode, message: str):
        """Await; on any failure close this worker (a TimeoutError becomes WorkerGone(code, message))."""
        try:
            return await awaitable
        except TimeoutError:
            await self.close()
            raise WorkerGone(code, message) from None
        except BaseException:
            await self.close()
            raise

    async def _connect(self) -> None:
        """Log the worker's stderr, then take up the protocol pipes and read the hello."""
        loop = asyncio.get_running_loop()
        stderr_reader = asyncio.StreamReader()
        self._stderr, _protocol = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stderr_reader), self.popen.stderr
        )
        self._stderr_task = asyncio.create_task(self._drain_stderr(stderr_reader))
        self._pipes = ipc.FrameChannel(self.popen.stdout.fileno(), self.popen.stdin.fileno())
        await self._hello()

    async def _hello(self) -> None:
        """Read the worker's sandbox report; refuse a worker that lacks a required layer."""
        try:
            frame = await self._pipes.exchange(b"", MAX_HELLO_BYTES, HELLO_TIMEOUT_SECONDS)  # the worker speaks first
            report = struct_pb2.Struct.FromString(frame)
            self.layers = [LayerResult(str(n), bool(a), str(d)) for n, a, d in report["layers"]]
            refused = str(report["refused"])
        except ipc.PipeClosed:
            raise WorkerGone(*await self.cause()) from None
        except (ipc.FrameError, DecodeError, KeyError, ValueError, TypeError) as exc:
            raise WorkerGone(ErrorCode.WORKER_PROTOCOL, f"unreadable sandbox report: {exc}") from None
        if self.cgroup is not None and not self.cgroup.contains(self.popen.pid):  # checked from outside too
            self.layers = [
                LayerResult(r.name, False, "the worker is not in its cgroup") if r.name == "cgroup" else r
                for r in self.layers
            ]
        refused = refused or self.config.sandbox.refusal(self.layers)
        if refused and not self.config.sandbox.check_only:
            raise WorkerGone(ErrorCode.SANDBOX_UNAVAILABLE, refused)

    def _reap(self) -> None:
        try:
            pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status, usage = self.popen.pid, -1, None
        if pid == 0:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.popen.returncode = os.waitstatus_to_exitcode(status) if status != -1 else -1
        cpu = usage.ru_utime + usage.ru_stime if usage else 0.0
        if not self.exited.done():
            self.exited.set_result(Exit(self.popen.returncode, cpu))

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def _drain_stderr(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            log.info("model %s: %s", self.model_id, line[:MAX_LOG_LINE].decode(errors="replace").rstrip())

    async def cause(self) -> tuple[ErrorCode, str]:
        """Why the worker is gone: waits briefly for its exit status, then asks its cgroup."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), EXIT_STATUS_WAIT_SECONDS)
        if not self.exited.done():
            return ErrorCode.WORKER_CRASHED, "worker closed its pipe"
        end = self.exited.result()
        limits: WorkerLimits = self.config.limits
        if self.cgroup is not None and self.cgroup.oom_kills():
            return ErrorCode.MEMORY_LIMIT, f"worker killed by its memory limit ({limits.memory_bytes >> 20} MiB)"
        if end.returncode == -signal.SIGXCPU or (
            end.returncode == -signal.SIGKILL and end.cpu_seconds >= limits.cpu_seconds
        ):
            return ErrorCode.CPU_LIMIT, f"worker used up its {limits.cpu_seconds} CPU seconds ({_describe(end.returncode)})"
        if end.returncode == SANDBOX_EXIT_CODE:
            return ErrorCode.SANDBOX_UNAVAILABLE, "worker refused to start: a required sandbox layer is missing"
        return ErrorCode.WORKER_CRASHED, f"worker exited ({_describe(end.returncode)})"

    async def request(self, frame: bytes, kind: str, timeout: float) -> worker_pb2.WorkerResponse:
        """One round trip of a framed `kind` request; TimeoutError if no answer within `timeout` seconds."""
        try:
            payload = await self._pipes.exchange(frame, ipc.MAX_FRAME_BYTES, timeout)
        except ipc.PipeClosed:
            raise WorkerGone(*await self.cause()) from None
        except ipc.FrameError as exc:
            raise WorkerGone(ErrorCode.WORKER_PROTOCOL, str(exc)) from None
        try:
            response = worker_pb2.WorkerResponse.FromString(payload)
        except DecodeError:
            raise WorkerGone(ErrorCode.WORKER_PROTOCOL, "worker sent an unparsable frame") from None
        if response.WhichOneof("kind") != kind:
            raise WorkerGone(ErrorCode.WORKER_PROTOCOL, "worker answered a different request kind")
        return response

    def kill(self) -> None:
        """Kill the worker's whole process group, so children it forked die too."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Kill the worker and everything left in its cgroup; remove the cgroup and any scratch dir."""
        self.kill()
        await self.exited
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.remove)  # strays that left the process group die here
        if self._pipes is not None:
            self._pipes.close()
        self.popen.stdin.close()
        self.popen.stdout.close()
        if self._stderr_task is not None:  # the last log lines; a stray child could hold the pipe open
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), EXIT_STATUS_WAIT_SECONDS)
        if self._stderr is not None:
            self._stderr.close()
        scratch = Path(scratch_dir(self.popen.pid))
        if scratch.exists():  # only made when the filesystem layer was missing
            await asyncio.to_thread(shutil.rmtree, scratch, True)


async def check_sandbox(limits: WorkerLimits, policy: SandboxPolicy) -> list[LayerResult]:
    """Start a throwaway worker that applies and verifies every layer; return what it found."""
    with tempfile.TemporaryDirectory(prefix="secure-runner-check-") as folder:
        os.chmod(folder, 0o755)  # an empty stand-in submission, readable like a real one
        config = WorkerConfig(
            folder, os.getpid(), [], limits, replace(policy, allow_missing=LAYERS, check_only=True)
        )
        process = await WorkerProcess.spawn("sandbox-check", config)
        await process.close()
    cgroups.remove_runner_dirs()
    return process.layers


def log_layers(model_id: str, layers: list[LayerResult], policy: SandboxPolicy) -> None:
    for layer in layers:
        if layer.active:
            log.info("model %s: sandbox layer %s: %s", model_id, layer.name, layer.detail)
        else:
            allowed = " (allowed by --allow-missing-layer)" if not policy.required(layer.name) else ""
            log.warning("model %s: sandbox layer %s is MISSING%s: %s", model_id, layer.name, allowed, layer.detail)


@dataclass
class ModelHost:
    """Runs one hosted model: its worker, its last Setup, its deadlines and its health."""

    model_id: str
    submission: Path
    base_paths: list[Path] = field(default_factory=list)
    limits: WorkerLimits = WorkerLimits()
    setup_timeout: float = 60.0
    on_health: Callable[[str, bool], None] = lambda model_id, serving: None
    sandbox: SandboxPolicy = SandboxPolicy()

    def __post_init__(self) -> None:
        # The model's turn: one request at a time. A semaphore, because its locked() says
        # whether acquire() would wait (a Lock's does not while a released turn is in handover).
        self._lock = asyncio.BoundedSemaphore(1)
        self._process: WorkerProcess | None = None
        self._setup: runner_pb2.SetupRequest | None = None
        self._setup_response: runner_pb2.SetupResponse | None = None
        self.methods: frozenset[str] = frozenset()  # callable ones, from the last successful Setup
        self._background: set[asyncio.Task] = set()
        self._restarting: asyncio.Task | None = None
        self._closed = False  # close() is final: no worker starts after it
        self._failures = 0  # consecutive worker failures, reset by a successful call
        self._retry_at = 0.0  # monotonic time before which no new worker is started
        self._last_failure = (ErrorCode.WORKER_CRASHED, "")
        self._layers_logged = False  # the sandbox report is logged for the first worker only

    def _worker_config(self) -> WorkerConfig:
        return WorkerConfig(
            str(self.submission), os.getpid(), [str(p) for p in self.base_paths], self.limits, self.sandbox
        )

    async def start(self) -> None:
        async with self._lock:
            await self._ensure_worker()

    async def close(self) -> None:
        """Stop hosting the model for good: no worker is started afterwards, whatever calls were under way."""
        self._closed = True
        if self._restarting is not None:
            self._restarting.cancel()
        async with self._lock:  # a call in progress ends first
            await self._close_worker()
        # Let discarded workers finish closing: that removes their cgroups.
        await asyncio.gather(*list(self._background), return_exceptions=True)
        cgroups.remove_runner_dirs()  # succeeds once the last model of this runner is closed

    def _record_failure(self, code: ErrorCode, message: str) -> None:
        self._failures += 1
        self._last_failure = (code, message)
        delay = backoff_seconds(self._failures)
        self._retry_at = time.monotonic() + delay
        if delay:
            log.warning("model %s: %d consecutive worker failures (%s); next start in %.1f s",
                        self.model_id, self._failures, code, delay)

    async def _ensure_worker(self) -> None:
        """Under the lock: make sure a live worker exists and has the last Setup applied."""
        if self._process is not None and self._process.returncode is None:
            return
        if self._closed:
            raise WorkerGone(ErrorCode.MODEL_UNKNOWN, f"model {self.model_id} is no longer hosted here")
        first_to_hear = self._process is not None
        if first_to_hear:  # died between requests: this call reports the cause
            process, self._process = self._process, None
            code, message = await process.cause()
            self._record_failure(code, message)
            self._spawn_background(process.close())
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            code, message = self._last_failure
            if not first_to_hear:  # the cause was reported once already: do not blame the model again
                code, message = ErrorCode.MODEL_RESTARTING, f"worker being replaced after {code}: {message}"
            raise WorkerGone(code, f"{message}; worker restarts in {wait:.1f} s")
        try:
            await self._start_worker()
        except WorkerGone as exc:
            self._record_failure(exc.code, exc.message)
            raise

    async def _start_worker(self) -> None:
        process = await WorkerProcess.spawn(self.model_id, self._worker_config())
        if not self._layers_logged:
            self._layers_logged = True
            log_layers(self.model_id, process.layers, self.sandbox)
        if self._setup is not None:
            response = await process.or_close(
                process.request(
                    _worker_frame(worker_pb2.WorkerRequest(setup=self._setup)), "setup", self.setup_timeout
                ),
                ErrorCode.MODEL_TIMEOUT, "replayed setup timed out",
            )
            if response.setup.status != SUCCESS:
                await process.close()
                raise WorkerGone(ErrorCode.WORKER_CRASHED, f"replayed setup failed: {response.setup.error.message}")
        self._process = process
        process.exited.add_done_callback(lambda _exit: self._exited(process))
        self.on_health(self.model_id, True)

    def _exited(self, process: WorkerProcess) -> None:
        """A worker died on its own (between calls, too): health says so at once, a restart is scheduled."""
        if process is self._process:
            self.on_health(self.model_id, False)
            self._schedule_restart()

    async def _close_worker(self) -> None:
        """Under the lock: close the current worker on purpose (detached first, so it is not a failure)."""
        process, self._process = self._process, None
        if process is not None:
            await process.close()

    def _discard_worker(self, code: ErrorCode, message: str) -> None:
        """Kill the current worker now and start a new one in the background, after the backoff."""
        self._record_failure(code, message)
        if self._process is not None:
            self._process.kill()
            process, self._process = self._process, None
            self._spawn_background(process.close())
        self.on_health(self.model_id, False)
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        if self._closed:
            return
        if self._restarting is None or self._restarting.done():
            self._restarting = self._spawn_background(self._restart_when_due())

    async def _restart_when_due(self) -> None:
        """Keep trying (with backoff) until a worker is up, so health recovers without calls."""
        while True:
            await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
            try:
                await self.start()
                return
            except WorkerGone as exc:
                log.warning("model %s: worker restart failed: %s", self.model_id, exc)

    def _spawn_background(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)
        return task

    async def setup(self, request: runner_pb2.SetupRequest) -> runner_pb2.SetupResponse:
        wanted = _without_model_id(request)
        async with self._lock:
            if self._setup == wanted and self._setup_response is not None:
                return self._setup_response  # idempotent: a reconnecting client sets up again
            try:
                if self._setup is not None or self._process is None:
                    await self._restart_fresh()
            except WorkerGone as exc:
                return runner_pb2.SetupResponse(status=FAILURE, error=values_pb2.ErrorDetail(code=exc.code, message=exc.message))
            frame = _worker_frame(worker_pb2.WorkerRequest(setup=wanted))
            response = await self._send(frame, "setup", self.setup_timeout)
            if isinstance(response, runner_pb2.CallResponse):  # the worker timed out or died
                return runner_pb2.SetupResponse(status=response.status, error=response.error)
            if response.setup.status == SUCCESS:
                self._setup, self._setup_response = wanted, response.setup
                self.methods = frozenset(response.setup.methods)
            else:
                with contextlib.suppress(WorkerGone):
                    await self._restart_fresh()  # a failed import leaves modules behind: start clean
            return response.setup

    async def _restart_fresh(self) -> None:
        self._setup = self._setup_response = None
        self.methods = frozenset()
        await self._close_worker()
        await self._ensure_worker()

    async def call(self, call: WorkerCall, timeout: float) -> runner_pb2.CallResponse:
        if call.method not in self.methods:
            raise RequestError(ErrorCode.METHOD_NOT_ALLOWED, f"{call.method!r} is not declared by the base class")
        deadline = time.monotonic() + timeout
        if not await self._take_turn(timeout):
            return failure_response(ErrorCode.MODEL_TIMEOUT, "model was still busy with an earlier call", TIMEOUT)
        try:
            await self._ensure_worker()
            left = deadline - time.monotonic()
            if left <= 0:  # the turn or a worker restart used it up: nothing sent, the worker is fine
                return failure_response(ErrorCode.MODEL_TIMEOUT, "no time left once the model was free", TIMEOUT)
            sent = time.perf_counter_ns()
            response = await self._send(call.frame, "call", left)
            if isinstance(response, runner_pb2.CallResponse):
                return response
            if response.call.status == SUCCESS:
                self._failures = 0
            # The model's time as this runner saw it, whatever the worker wrote there.
            response.call.model_latency_us = (time.perf_counter_ns() - sent) // 1000
            return response.call
        except WorkerGone as exc:
            self.on_health(self.model_id, False)
            self._schedule_restart()
            return _gone(exc)
        finally:
            self._lock.release()

    async def _take_turn(self, timeout: float) -> bool:
        """Take the model's lock within `timeout` seconds; False if it is not free by then.

        A free model is taken at once, without arming a timer; no time left means no turn.
        """
        if timeout <= 0:
            return False
        if not self._lock.locked():
            await self._lock.acquire()  # does not wait: locked() is false exactly when it would not
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._lock.acquire()
        except TimeoutError:
            return False
        return True

    async def reset(self) -> None:
        async with self._lock:
            await self._close_worker()
            self.on_health(self.model_id, False)
            try:
                await self._ensure_worker()
            except WorkerGone:
                self._schedule_restart()

    async def _send(
        self, frame: bytes, kind: str, timeout: float
    ) -> worker_pb2.WorkerResponse | runner_pb2.CallResponse:
        """Under the lock: one round trip, or a failure response after discarding the worker."""
        assert self._process is not None
        try:
            return await self._process.request(frame, kind, timeout)
        except TimeoutError:
            message = f"no answer within {timeout:.3f} s; worker restarted"
            self._discard_worker(ErrorCode.MODEL_TIMEOUT, message)
            return failure_response(ErrorCode.MODEL_TIMEOUT, message, TIMEOUT)
        except WorkerGone as exc:
            self._discard_worker(exc.code, exc.message)
            return _gone(exc)
        except asyncio.CancelledError:
            self._discard_worker(ErrorCode.MODEL_TIMEOUT, "the caller went away")  # never leave the model running
            raise


def _without_model_id(request: runner_pb2.SetupRequest) -> runner_pb2.SetupRequest:
    copy = runner_pb2.SetupRequest()
    copy.CopyFrom(request)
    copy.ClearField("model_id")
    return copy


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("worker restart failed: %s", task.exception())
