"""Supervision of one model's worker subprocess.

A `ModelHost` owns one worker at a time and serializes requests to it (a model
instance is stateful and single-threaded). It enforces every deadline itself:
a call that overruns is answered TIMEOUT at once, the worker's whole process
group is killed, and a fresh worker is started and given the model's last
Setup again before the next request is served. Health goes NOT_SERVING from
the kill until the new worker is set up. A worker that dies, or breaks the
framing, is treated the same way and reported as a model fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from secure_runner.errors import ErrorCode, RequestError
from secure_runner.runner import ipc
from secure_runner.runner.worker import WorkerConfig, WorkerLimits
from secure_runner.v1 import runner_pb2, values_pb2, worker_pb2

log = logging.getLogger(__name__)

FAILURE = runner_pb2.CALL_STATUS_FAILURE
TIMEOUT = runner_pb2.CALL_STATUS_TIMEOUT
SUCCESS = runner_pb2.CALL_STATUS_SUCCESS
MAX_LOG_LINE = 2000
EXIT_STATUS_WAIT_SECONDS = 1.0
# Variables a worker may inherit: none carries a secret. Everything else is dropped.
PASSED_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
WORKER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class WorkerGone(Exception):
    """The worker exited, closed its pipe or broke the framing rules."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _failure(code: ErrorCode, message: str, status: int = FAILURE) -> runner_pb2.CallResponse:
    return runner_pb2.CallResponse(status=status, error=values_pb2.ErrorDetail(code=code, message=message))


class WorkerProcess:
    """One live worker subprocess and its framed pipes."""

    def __init__(self, model_id: str, proc: asyncio.subprocess.Process) -> None:
        self.model_id = model_id
        self.proc = proc
        self._stderr_task = asyncio.create_task(self._drain_stderr())

    @classmethod
    async def spawn(cls, model_id: str, config: WorkerConfig) -> WorkerProcess:
        env = WORKER_ENV | {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-m", "secure_runner.runner.worker", config.to_json(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=config.submission,
            start_new_session=True,
            close_fds=True,
        )
        return cls(model_id, proc)

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            log.info("model %s: %s", self.model_id, line[:MAX_LOG_LINE].decode(errors="replace").rstrip())

    async def request(self, request: worker_pb2.WorkerRequest) -> worker_pb2.WorkerResponse:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(ipc.encode_frame(request.SerializeToString()))
            await self.proc.stdin.drain()
            length = ipc.frame_length(await self.proc.stdout.readexactly(ipc.HEADER.size))
            payload = await self.proc.stdout.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            # The pipe closes a moment before the exit status is known: wait for it briefly.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), EXIT_STATUS_WAIT_SECONDS)
            raise WorkerGone(ErrorCode.WORKER_CRASHED, f"worker exited ({self._exit_description()})") from None
        except ipc.FrameError as exc:
            raise WorkerGone(ErrorCode.WORKER_PROTOCOL, str(exc)) from None
        try:
            response = worker_pb2.WorkerResponse.FromString(payload)
        except DecodeError:
            raise WorkerGone(ErrorCode.WORKER_PROTOCOL, "worker sent an unparsable frame") from None
        if response.WhichOneof("kind") != request.WhichOneof("kind"):
            raise WorkerGone(ErrorCode.WORKER_PROTOCOL, "worker answered a different request kind")
        return response

    def _exit_description(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "pipe closed"
        return f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"

    def kill(self) -> None:
        """Kill the worker's whole process group, so children it forked die too."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        self.kill()
        await self.proc.wait()
        await self._stderr_task


@dataclass
class ModelHost:
    """Runs one hosted model: its worker, its last Setup, its deadlines and its health."""

    model_id: str
    submission: Path
    base_paths: list[Path] = field(default_factory=list)
    limits: WorkerLimits = WorkerLimits()
    setup_timeout: float = 60.0
    on_health: Callable[[str, bool], None] = lambda model_id, serving: None

    def __post_init__(self) -> None:
        self._lock = asyncio.Lock()
        self._process: WorkerProcess | None = None
        self._setup: runner_pb2.SetupRequest | None = None
        self._setup_response: runner_pb2.SetupResponse | None = None
        self._background: set[asyncio.Task] = set()

    @property
    def methods(self) -> frozenset[str]:
        return frozenset(self._setup_response.methods) if self._setup_response else frozenset()

    def _worker_config(self) -> WorkerConfig:
        return WorkerConfig(str(self.submission), os.getpid(), [str(p) for p in self.base_paths], self.limits)

    async def start(self) -> None:
        async with self._lock:
            await self._ensure_worker()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        async with self._lock:
            if self._process:
                await self._process.close()
                self._process = None

    async def _ensure_worker(self) -> None:
        """Under the lock: make sure a live worker exists and has the last Setup applied."""
        if self._process is not None and self._process.proc.returncode is None:
            return
        self._process = await WorkerProcess.spawn(self.model_id, self._worker_config())
        if self._setup is not None:
            try:
                response = await asyncio.wait_for(
                    self._process.request(worker_pb2.WorkerRequest(setup=self._setup)), self.setup_timeout
                )
            except TimeoutError:
                self._process.kill()
                raise WorkerGone(ErrorCode.MODEL_TIMEOUT, "replayed setup timed out") from None
            if response.setup.status != SUCCESS:
                raise WorkerGone(ErrorCode.WORKER_CRASHED, f"replayed setup failed: {response.setup.error.message}")
        self.on_health(self.model_id, True)

    def _discard_worker(self) -> None:
        """Kill the current worker now and start a new one in the background."""
        if self._process is not None:
            self._process.kill()
            process, self._process = self._process, None
            self._spawn_background(process.close())
        self.on_health(self.model_id, False)
        self._spawn_background(self.start())

    def _spawn_background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    async def setup(self, request: runner_pb2.SetupRequest) -> runner_pb2.SetupResponse:
        wanted = _without_model_id(request)
        async with self._lock:
            if self._setup == wanted and self._setup_response is not None:
                return self._setup_response  # idempotent: a reconnecting client sets up again
            if self._setup is not None or self._process is None:
                await self._restart_fresh()
            response = await self._send(worker_pb2.WorkerRequest(setup=wanted), self.setup_timeout)
            if isinstance(response, runner_pb2.CallResponse):  # the worker timed out or died
                return runner_pb2.SetupResponse(status=response.status, error=response.error)
            if response.setup.status == SUCCESS:
                self._setup, self._setup_response = wanted, response.setup
            else:
                await self._restart_fresh()  # a failed import leaves modules behind: start clean
            return response.setup

    async def _restart_fresh(self) -> None:
        self._setup = self._setup_response = None
        if self._process is not None:
            await self._process.close()
            self._process = None
        await self._ensure_worker()

    async def call(self, request: runner_pb2.CallRequest, timeout: float) -> runner_pb2.CallResponse:
        if request.method not in self.methods:
            raise RequestError(ErrorCode.METHOD_NOT_ALLOWED, f"{request.method!r} is not declared by the base class")
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self._lock.acquire(), timeout)
        except TimeoutError:
            return _failure(ErrorCode.MODEL_TIMEOUT, "model was still busy with an earlier call", TIMEOUT)
        try:
            await self._ensure_worker()
            response = await self._send(worker_pb2.WorkerRequest(call=request), deadline - time.monotonic())
            return response if isinstance(response, runner_pb2.CallResponse) else response.call
        except WorkerGone as exc:
            return _failure(exc.code, str(exc))
        finally:
            self._lock.release()

    async def reset(self) -> None:
        async with self._lock:
            if self._process is not None:
                await self._process.close()
                self._process = None
            self.on_health(self.model_id, False)
            await self._ensure_worker()

    async def _send(
        self, request: worker_pb2.WorkerRequest, timeout: float
    ) -> worker_pb2.WorkerResponse | runner_pb2.CallResponse:
        """Under the lock: one round trip, or a failure response after discarding the worker."""
        assert self._process is not None
        try:
            return await asyncio.wait_for(self._process.request(request), max(timeout, 0.0))
        except TimeoutError:
            self._discard_worker()
            return _failure(ErrorCode.MODEL_TIMEOUT, f"no answer within {timeout:.3f} s; worker restarted", TIMEOUT)
        except WorkerGone as exc:
            self._discard_worker()
            return _failure(exc.code, str(exc))
        except asyncio.CancelledError:
            self._discard_worker()  # the caller went away mid-call: never leave the model running
            raise


def _without_model_id(request: runner_pb2.SetupRequest) -> runner_pb2.SetupRequest:
    copy = runner_pb2.SetupRequest()
    copy.CopyFrom(request)
    copy.ClearField("model_id")
    return copy


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("worker restart failed: %s", task.exception())
