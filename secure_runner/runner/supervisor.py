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

Each worker is forked by the runner's template (runner/template.py; it becomes
the runner's own child before its pid is known here) or, without one, started
with `subprocess.Popen` (no preexec_fn: the runner is threaded); either way it
is given its configuration as the first frame on its stdin (never
on its command line, which any process can read in /proc), gets its own cgroup
(made here, joined by the worker) and reports the sandbox layers in force in
its first frame before it may load any code.

Nothing a worker writes is trusted beyond its size-capped, parsed frames:
- The method allowlist (R-1) is read once per worker process, from its answer
  to a `base_class` request, the first request it gets after its sandbox
  report. The worker imports the base class and answers before the
  submission's folder is on its sys.path, so no submission code has run in
  that process when the answer is written: it is trusted code's answer. The
  runner process itself never imports the base class: that would load the
  coordinator's code and its dependencies (numpy, pandas...) next to the TLS
  key, in every runner, for one list of names. The names are kept to callable
  ones (`allowlist.narrowed`), and nothing the worker says after its
  submission loaded can change them.
- Answers are capped on the runner's side: a call's at the 16 MiB output cap
  (`worker.MAX_OUTPUT_BYTES`) plus room for its error, a Setup's at 1 MiB. A
  bigger frame is refused before it is read and is the model's own fault
  (MODEL_OUTPUT_TOO_LARGE). Failure codes are vetted (`vetted`): a model
  cannot claim the host's or the runner's codes.
- A deadline is judged by what the worker got: if its main thread spent at
  least half the call waiting for a CPU and the whole process ran less than
  half of it, the host was overloaded and the model starved, not slow
  (WORKER_STARVED, an infrastructure fault that counts against nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from secure_runner import allowlist
from secure_runner.backoff import doubling_delay
from secure_runner.errors import ErrorCode, RequestError, SecureRunnerError
from secure_runner.runner import ipc, shared_payload
from secure_runner.runner.call_stats import CallStats
from secure_runner.runner.sandbox import cgroups
from secure_runner.runner.sandbox.environment import worker_environment
from secure_runner.runner.sandbox.policy import LAYERS, LayerResult, SandboxPolicy, scratch_dir
from secure_runner.runner.template import WorkerTemplate, reap_orphan
from secure_runner.runner.worker import MAX_OUTPUT_BYTES, SANDBOX_EXIT_CODE, WorkerConfig, WorkerLimits
from secure_runner.v1 import runner_pb2, values_pb2, worker_pb2

log = logging.getLogger(__name__)

FAILURE = runner_pb2.CALL_STATUS_FAILURE
TIMEOUT = runner_pb2.CALL_STATUS_TIMEOUT
SUCCESS = runner_pb2.CALL_STATUS_SUCCESS
MAX_LOG_LINE = 2000
EXIT_STATUS_WAIT_SECONDS = 1.0
HELLO_TIMEOUT_SECONDS = 30.0
MAX_HELLO_BYTES = 64 * 1024
# Largest answers read from a worker: a call's output at its cap plus room for its error message and
# framing, and a Setup's class name and method names.
MAX_CALL_ANSWER_BYTES = MAX_OUTPUT_BYTES + 64 * 1024
MAX_SETUP_ANSWER_BYTES = 1024 * 1024
# Failure codes a worker may give, by answer: anything else (a claim that the host or the caller is
# to blame, say) is the model's own MODEL_OUTPUT_INVALID. Messages are cut to MAX_WORKER_MESSAGE.
CODEC_CODES = frozenset({ErrorCode.INVALID_ARGUMENTS, ErrorCode.UNSUPPORTED_TYPE, ErrorCode.INVALID_VALUE,
                         ErrorCode.VALUE_TOO_LARGE, ErrorCode.VALUE_TOO_DEEP})
WORKER_CALL_CODES = CODEC_CODES | {ErrorCode.MODEL_NOT_SET_UP, ErrorCode.METHOD_NOT_ALLOWED, ErrorCode.MEMORY_LIMIT,
                                   ErrorCode.MODEL_RAISED, ErrorCode.MODEL_OUTPUT_INVALID,
                                   ErrorCode.MODEL_OUTPUT_TOO_LARGE, ErrorCode.SHARED_PAYLOAD_REFUSED}
WORKER_BASE_CLASS_CODES = frozenset({ErrorCode.SETUP_BASE_CLASS, ErrorCode.SETUP_CONFLICT})
WORKER_SETUP_CODES = CODEC_CODES | {ErrorCode.SETUP_NO_CANDIDATE, ErrorCode.SETUP_MANY_CANDIDATES,
                                    ErrorCode.SETUP_IMPORT_FAILED, ErrorCode.SETUP_CONSTRUCTOR_FAILED,
                                    ErrorCode.SETUP_CONFLICT}
MAX_WORKER_MESSAGE = 1000
# At a deadline, a worker is starved (not slow) if its main thread waited at least this share of the
# call for a CPU and the whole process ran less than this share of it.
STARVED_SHARE = 0.5
# Restart delays after consecutive failures: none for the first, then doubling up to the cap.
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0


class WorkerGone(SecureRunnerError):
    """The worker exited, closed its pipe, broke the framing rules or refused to start."""


def failure_response(code: ErrorCode, message: str, status: int = FAILURE) -> runner_pb2.CallResponse:
    """A call's answer when the model gave none: the status (FAILURE or TIMEOUT) and why."""
    return runner_pb2.CallResponse(status=status, error=values_pb2.ErrorDetail(code=code, message=message))


def vetted(answer, codes: frozenset[str]):
    """A worker's answer (Call/SetupResponse, BaseClassReport) kept to SUCCESS or FAILURE with one of `codes`."""
    if answer.status == SUCCESS:
        answer.ClearField("error")
        return answer
    code = answer.error.code
    if answer.status != FAILURE or code not in codes:
        answer.error.code = ErrorCode.MODEL_OUTPUT_INVALID
        answer.error.message = f"the worker answered status {answer.status} with code {code[:64]!r}, which it may not"
        answer.status = FAILURE
    elif len(answer.error.message) > MAX_WORKER_MESSAGE:
        answer.error.message = answer.error.message[: MAX_WORKER_MESSAGE - 3] + "..."
    return answer


def _gone(exc: WorkerGone) -> runner_pb2.CallResponse:
    return failure_response(exc.code, exc.message, TIMEOUT if exc.code == ErrorCode.MODEL_TIMEOUT else FAILURE)


def backoff_seconds(failures: int) -> float:
    """Delay before the next start after `failures` consecutive failures (a first one: at once)."""
    return doubling_delay(failures, BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS, free=1)


@dataclass(frozen=True)
class WorkerCall:
    """A call as a worker receives it: its method (checked by the host), its frame and shared payload, made once.

    The frame carries no model id (a worker hosts one model), so a fan-out encodes its
    arguments once and sends the same bytes to every model that shares them. A value over
    `shared_payload.SHARED_THRESHOLD` is not in the frame: it is written once into one
    sealed memfd (`payload`) whose descriptor goes to every worker called, and the runner
    closes its descriptor (`close`) once they have all answered.
    """

    method: str
    frame: bytes
    payload: shared_payload.SealedPayload | None = None

    @classmethod
    def encode(cls, method: str, arguments, kwargs) -> WorkerCall:
        request = worker_pb2.WorkerRequest(call=runner_pb2.CallRequest(method=method))
        values = [(request.call.arguments.add(position=a.position).data, a.data, a.position, "") for a in arguments]
        values += [(request.call.kwargs.add(keyword=k.keyword).data, k.data, 0, k.keyword) for k in kwargs]
        payload = None
        try:
            for target, variant, position, keyword in values:
                # A copy out of the request (the only way to a bytes field's length without serializing it),
                # dropped before the next one is made.
                value = variant.value
                if len(value) <= shared_payload.SHARED_THRESHOLD:
                    target.CopyFrom(variant)
                    continue
                payload = payload or shared_payload.SealedPayload()
                target.type = variant.type
                request.shared.add(position=position, keyword=keyword, offset=payload.append(value), length=len(value))
                del value
            if payload is not None:
                payload.seal()
                request.shared_size = payload.size
            return cls(method, _worker_frame(request), payload)
        except BaseException as exc:
            if payload is not None:
                payload.close()
            if isinstance(exc, OSError):  # no memfd: descriptors or memory exhausted
                raise SecureRunnerError(ErrorCode.INTERNAL, f"cannot make the call's shared payload: {exc}") from None
            raise

    def close(self) -> None:
        """Close the runner's descriptor of the shared payload (once every worker called has answered)."""
        if self.payload is not None:
            self.payload.close()


def _worker_frame(request: worker_pb2.WorkerRequest) -> bytes:
    return ipc.encode_frame(request.SerializeToString())


@dataclass(frozen=True)
class CpuSample:
    """A worker's CPU account at one moment, in nanoseconds."""

    at: int  # time.monotonic_ns()
    main_waited: int  # the main thread's time runnable but waiting for a CPU (schedstat run_delay)
    process_ran: int  # CPU time of all its threads (utime + stime)
    # The wait schedstat has not counted yet: the kernel adds a wait to run_delay only when the task
    # next gets a CPU, so a task still waiting at the deadline shows none of its last, often longest,
    # wait. Estimated as the time since it last got a CPU when it is runnable (0 otherwise, or unknown).
    pending_wait: int = 0

    def starved_since(self, start: CpuSample) -> bool:
        """Between `start` and this sample, was the worker kept from running rather than slow itself?"""
        window = self.at - start.at
        waited = (self.main_waited + self.pending_wait) - (start.main_waited + start.pending_wait)
        ran = self.process_ran - start.process_ran
        return window > 0 and waited >= STARVED_SHARE * window and ran < STARVED_SHARE * window


CLOCK_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def _exec_start_ns(sched: bytes) -> int:
    """`se.exec_start` (milliseconds with six decimals) of a /proc/<pid>/sched text, in nanoseconds."""
    for line in sched.splitlines():
        if line.startswith(b"se.exec_start"):
            millis, _, micro = line.partition(b":")[2].strip().partition(b".")
            return int(millis) * 1_000_000 + int(micro.ljust(6, b"0")[:6])
    raise ValueError("no se.exec_start")


class CpuAccount:
    """Reads a worker's CPU account from the runner's /proc (files kept open: one pread each per sample).

    The process that runs model code is the worker itself, or its only child when the worker made
    a PID namespace (runner/sandbox/namespaces.py: the worker then only waits for that child).
    """

    @classmethod
    def of_worker(cls, pid: int) -> CpuAccount:
        with contextlib.suppress(OSError, ValueError):
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if len(children) == 1:
                return cls(int(children[0]))
        return cls(pid)

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fds: list[int] = []
        with contextlib.suppress(OSError):  # no account: every deadline is judged the model's
            for name in ("schedstat", "stat"):
                self._fds.append(os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC))
        self._sched: int | None = None  # /proc/<pid>/sched (kernels with scheduler debug info): pending waits
        with contextlib.suppress(OSError):
            self._sched = os.open(f"/proc/{pid}/sched", os.O_RDONLY | os.O_CLOEXEC)

    def sample(self) -> CpuSample | None:
        """None once the process is gone (or /proc does not say)."""
        if len(self._fds) != 2:
            return None
        try:
            schedstat, stat = self._fds
            main_waited = int(os.pread(schedstat, 128, 0).split()[1])
            fields = os.pread(stat, 1024, 0).rpartition(b")")[2].split()
            ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
        except (OSError, IndexError, ValueError):
            return None
        pending = self._pending_wait() if fields[0] == b"R" else 0
        return CpuSample(time.monotonic_ns(), main_waited, ticks * CLOCK_TICK_NS, pending)

    def _pending_wait(self) -> int:
        """Time since the runnable worker last got a CPU: our own last start minus its, on the scheduler's clock.

        Both `se.exec_start` values come from the same clock (the runner, reading, is on a CPU now), so no
        calibration against time.monotonic is needed. An overestimate by the worker's last slice at most.
        """
        if self._sched is None:
            return 0
        try:
            theirs = _exec_start_ns(os.pread(self._sched, 4096, 0))
            with open("/proc/thread-self/sched", "rb") as own:
                ours = _exec_start_ns(own.read(4096))
        except (OSError, ValueError):
            return 0
        return max(0, ours - theirs)

    def close(self) -> None:
        fds, self._fds = self._fds + ([self._sched] if self._sched is not None else []), []
        self._sched = None
        for fd in fds:
            os.close(fd)


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
                 cgroup: cgroups.WorkerCgroup | None, payload_socket: socket.socket) -> None:
        self.model_id = model_id
        self.popen = popen
        self._payload_socket = payload_socket  # this worker's alone: shared payload descriptors go to it
        self.config = config
        self.cgroup = cgroup
        self.layers: list[LayerResult] = []
        self.pristine = True  # no setup request sent yet: no submission code has run in it
        self.cpu: CpuAccount | None = None  # once its sandbox is up (see _connect)
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[Exit] = loop.create_future()
        self._pidfd = os.pidfd_open(popen.pid)
        loop.add_reader(self._pidfd, self._reap)
        self._pipes: ipc.FrameChannel | None = None  # the protocol: the worker's stdin and stdout
        self._stderr: asyncio.BaseTransport | None = None
        self._stderr_task: asyncio.Task | None = None

    @classmethod
    async def spawn(cls, model_id: str, config: WorkerConfig, template: WorkerTemplate | None = None) -> WorkerProcess:
        """Start a worker: forked from the runner's `template` if there is one that works, else a fresh interpreter."""
        cgroup, error = None, ""
        try:
            cgroup = cgroups.WorkerCgroup.create(model_id, config.limits)
        except (cgroups.CgroupUnavailable, OSError, ValueError) as exc:  # reported as a missing layer
            error = str(exc)
        payload_socket, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)  # shared_payload.py
        config = replace(config, cgroup_procs=cgroup.procs_files if cgroup else [], cgroup_error=error,
                         payload_fd=worker_end.fileno())
        worker_fds = (worker_end.fileno(),)  # handed over at the same number, besides stdin, stdout and stderr
        try:
            forked = await template.popen(worker_fds) if template is not None else None  # None: the template failed (logged)
            popen = forked or subprocess.Popen(
                [sys.executable, "-I", "-m", "secure_runner.runner.worker"],  # the configuration goes over stdin
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=worker_environment(dict(os.environ)),
                cwd=config.submission,
                start_new_session=True,
                close_fds=True,
                pass_fds=worker_fds,
            )
        except OSError as exc:
            payload_socket.close()
            if cgroup:
                cgroup.remove()
            raise WorkerGone(ErrorCode.WORKER_CRASHED, f"cannot start a worker: {exc}") from None
        finally:
            worker_end.close()  # the worker has its own copy now
        payload_socket.setblocking(False)
        process = cls(model_id, popen, config, cgroup, payload_socket)
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
        self.cpu = CpuAccount.of_worker(self.popen.pid)

    async def _hello(self) -> None:
        """Send the worker its configuration, read its sandbox report; refuse a worker that lacks a required layer."""
        configuration = ipc.encode_frame(self.config.to_json().encode())
        try:
            frame = await self._pipes.exchange(configuration, MAX_HELLO_BYTES, HELLO_TIMEOUT_SECONDS)
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

    async def request(self, frame: bytes, kind: str, timeout: float, cap: int,
                      shared: shared_payload.SealedPayload | None = None) -> worker_pb2.WorkerResponse:
        """One round trip of a framed `kind` request, its answer at most `cap` bytes; TimeoutError if none in time.

        The descriptor of the request's `shared` payload is queued on the worker's payload socket first.
        """
        if shared is not None:
            try:
                shared.send(self._payload_socket)
            except OSError as exc:  # the worker does not take its descriptors (or the request was given up)
                raise WorkerGone(ErrorCode.WORKER_PROTOCOL, f"cannot hand the worker its shared payload: {exc}") from None
        try:
            payload = await self._pipes.exchange(frame, cap, timeout)
        except ipc.PipeClosed:
            raise WorkerGone(*await self.cause()) from None
        except ipc.FrameTooLarge as exc:
            raise WorkerGone(ErrorCode.MODEL_OUTPUT_TOO_LARGE, f"the model's answer was refused: {exc}") from None
        except ipc.FrameError as exc:
            raise WorkerGone(ErrorCode.WORKER_PROTOCOL, str(exc)) from None
        try:
            response = worker_pb2.WorkerResponse.FromString(payload)
        except DecodeError:
            raise WorkerGone(ErrorCode.WORKER_PROTOCOL, "worker sent an unparsable frame") from None
        if response.WhichOneof("kind") != kind:
            raise WorkerGone(ErrorCode.WORKER_PROTOCOL, "worker answered a different request kind")
        return response

    async def setup(
        self, request: runner_pb2.SetupRequest, timeout: float
    ) -> tuple[runner_pb2.SetupResponse, frozenset[str]]:
        """Set this fresh worker up: its answer, with the methods callable on it (see the module docstring).

        The allowlist comes from the `base_class` step, answered before the submission
        is on the worker's sys.path; the SetupResponse that follows (written after
        submission code ran) is given the runner's list, never its own.
        """
        if not self.pristine:
            raise WorkerGone(ErrorCode.SETUP_CONFLICT, "a worker is set up once")
        self.pristine = False
        deadline = time.monotonic() + timeout
        answer = await self.request(
            _worker_frame(worker_pb2.WorkerRequest(base_class=request)), "base_class", timeout, MAX_SETUP_ANSWER_BYTES
        )
        report = vetted(answer.base_class, WORKER_BASE_CLASS_CODES)
        if report.status != SUCCESS:
            return runner_pb2.SetupResponse(status=FAILURE, error=report.error), frozenset()
        methods = allowlist.narrowed(None, report.methods)
        answer = await self.request(
            _worker_frame(worker_pb2.WorkerRequest(setup=request)), "setup", deadline - time.monotonic(),
            MAX_SETUP_ANSWER_BYTES,
        )
        response = vetted(answer.setup, WORKER_SETUP_CODES)
        del response.methods[:]
        if response.status != SUCCESS:
            return response, frozenset()
        response.methods.extend(sorted(methods))
        return response, methods

    def kill(self) -> None:
        """Kill the worker's whole process group, so children it forked die too."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Kill the worker and everything left in its cgroup; remove the cgroup and any scratch dir."""
        self.kill()
        await self.exited
        if self.cpu is not None:
            self.cpu.close()
            await reap_orphan(self.cpu.pid)  # its pid-1 child, if reparented to this (subreaper) runner: a zombie keeps a cgroup busy
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.remove)  # strays that left the process group die here
        if self._pipes is not None:
            self._pipes.close()
        self._payload_socket.close()
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


async def check_sandbox(limits: WorkerLimits, policy: SandboxPolicy, worker_template: bool = True) -> list[LayerResult]:
    """Start a throwaway worker (from a template, as a runner does, unless turned off) that applies and verifies every layer."""
    template = WorkerTemplate() if worker_template else None
    with tempfile.TemporaryDirectory(prefix="secure-runner-check-") as folder:
        os.chmod(folder, 0o755)  # an empty stand-in submission, readable like a real one
        config = WorkerConfig(
            folder, os.getpid(), [], limits, replace(policy, allow_missing=LAYERS, check_only=True)
        )
        try:
            process = await WorkerProcess.spawn("sandbox-check", config, template)
            await process.close()
        finally:
            if template is not None:
                await template.close()
    cgroups.remove_runner_dirs()
    return process.layers


def log_layers(model_id: str, layers: list[LayerResult], policy: SandboxPolicy) -> None:
    for layer in layers:
        if layer.active:
            log.info("model %s: sandbox layer %s: %s", model_id, layer.name, layer.detail)
        elif policy.provided_by(layer.name):  # the pod profile: not the runner's to apply
            log.info("model %s: sandbox layer %s is provided by the Pod (profile %s): %s; not applied here: %s",
                     model_id, layer.name, policy.profile, policy.provided_by(layer.name), layer.detail)
        else:
            allowed = " (allowed by --allow-missing-layer)" if not policy.required(layer.name) else ""
            log.warning("model %s: sandbox layer %s is MISSING%s: %s", model_id, layer.name, allowed, layer.detail)


class ModelState(StrEnum):
    """Where a hosted model stands (`ModelHost.status`)."""

    STARTING = "STARTING"  # its first worker is being started
    READY = "READY"  # a worker is up and waits for Setup
    SERVING = "SERVING"  # a worker is up and set up
    SETUP_FAILED = "SETUP_FAILED"  # its last Setup failed; a new one waits for the backoff
    RECOVERING = "RECOVERING"  # its worker failed (or could not start) and is being replaced, with backoff
    STOPPED = "STOPPED"  # no longer hosted


@dataclass(frozen=True)
class ModelStatus:
    """A hosted model's state, its last failure (code and message; empty if none) and since when (Unix time)."""

    state: ModelState
    failure_code: str
    failure_message: str
    since: float
    consecutive_failures: int


@dataclass
class ModelHost:
    """Runs one hosted model: its worker, its last Setup, its deadlines, its health and its status."""

    model_id: str
    submission: Path
    base_paths: list[Path] = field(default_factory=list)
    limits: WorkerLimits = WorkerLimits()
    setup_timeout: float = 60.0
    on_health: Callable[[str, bool], None] = lambda model_id, serving: None
    sandbox: SandboxPolicy = SandboxPolicy()
    stats: CallStats = field(default_factory=CallStats)  # its calls, counted by the server (STATUS)
    template: WorkerTemplate | None = None  # the runner's worker template (None: every worker a fresh interpreter)
    on_failure: Callable[[str, str], None] = lambda model_id, code: None  # its worker is replaced after `code`

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
        self._failures = 0  # consecutive worker or setup failures, reset by a successful call or setup
        self._retry_at = 0.0  # monotonic time before which no new worker is started
        self._last_failure: tuple[str, str] | None = None  # (code, message), kept after a recovery
        self._layers_logged = False  # the sandbox report is logged for the first worker only
        self._status = ModelStatus(ModelState.STARTING, "", "", time.time(), 0)

    @property
    def status(self) -> ModelStatus:
        return self._status

    @property
    def layers(self) -> list[LayerResult]:
        """The sandbox layers of the live worker (none while no worker is up): for metrics."""
        process = self._process
        return process.layers if process is not None and process.returncode is None else []

    def _set_state(self, state: ModelState) -> None:
        code, message = self._last_failure or ("", "")
        since = self._status.since if state is self._status.state else time.time()
        self._status = ModelStatus(state, str(code), message, since, self._failures)

    def _worker_config(self) -> WorkerConfig:
        return WorkerConfig(
            str(self.submission), os.getpid(), [str(p) for p in self.base_paths], self.limits, self.sandbox
        )

    async def start(self) -> None:
        async with self._lock:
            await self._ensure_worker()

    def keep_starting(self) -> None:
        """After a failed start: keep trying in the background, with backoff, until a worker is up."""
        self.on_health(self.model_id, False)
        self._schedule_restart()

    async def close(self) -> None:
        """Stop hosting the model for good: no worker is started afterwards, whatever calls were under way."""
        self._closed = True
        if self._restarting is not None:
            self._restarting.cancel()
        async with self._lock:  # a call in progress ends first
            await self._close_worker()
        self._set_state(ModelState.STOPPED)
        # Let discarded workers finish closing: that removes their cgroups.
        await asyncio.gather(*list(self._background), return_exceptions=True)
        cgroups.remove_runner_dirs()  # succeeds once the last model of this runner is closed

    def _record_failure(self, code: str, message: str, state: ModelState = ModelState.RECOVERING) -> None:
        self.on_failure(self.model_id, code)
        self._failures += 1
        self._last_failure = (code, message)
        delay = backoff_seconds(self._failures)
        self._retry_at = time.monotonic() + delay
        self._set_state(state)
        if delay:
            log.warning("model %s: %d consecutive failures (%s); next start in %.1f s",
                        self.model_id, self._failures, code, delay)

    def _succeeded(self, state: ModelState) -> None:
        self._failures = 0
        self._set_state(state)

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
        process = await WorkerProcess.spawn(self.model_id, self._worker_config(), self.template)
        if not self._layers_logged:
            self._layers_logged = True
            log_layers(self.model_id, process.layers, self.sandbox)
        if self._setup is not None:
            response, methods = await process.or_close(
                process.setup(self._setup, self.setup_timeout), ErrorCode.MODEL_TIMEOUT, "replayed setup timed out"
            )
            if response.status != SUCCESS:
                await process.close()
                raise WorkerGone(ErrorCode.WORKER_CRASHED, f"replayed setup failed: {response.error.message}")
            self.methods &= methods  # a replay can narrow what is callable, never widen it
        self._process = process
        process.exited.add_done_callback(lambda _exit: self._exited(process))
        self._set_state(ModelState.READY if self._setup is None else ModelState.SERVING)
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

    def _discard_worker(self, code: ErrorCode, message: str, *, blame: bool = True) -> None:
        """Kill the current worker now and start a new one in the background (after the backoff if `blame`)."""
        if blame:
            self._record_failure(code, message)
        else:
            self.on_failure(self.model_id, code)
            self._set_state(ModelState.RECOVERING)
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
        """Set the model up on a worker that never saw a Setup; a failed Setup backs off like a failed worker."""
        wanted = _without_model_id(request)
        async with self._lock:
            if self._setup == wanted and self._setup_response is not None:
                return self._setup_response  # idempotent: a reconnecting client sets up again
            try:
                if self._process is None or not self._process.pristine:
                    await self._restart_fresh()
            except WorkerGone as exc:
                return runner_pb2.SetupResponse(status=FAILURE, error=values_pb2.ErrorDetail(code=exc.code, message=exc.message))
            answer = await self._send(self._process.setup(wanted, self.setup_timeout), self.setup_timeout)
            if isinstance(answer, runner_pb2.CallResponse):  # the worker timed out or died
                return runner_pb2.SetupResponse(status=answer.status, error=answer.error)
            response, methods = answer
            if response.status == SUCCESS:
                self._setup, self._setup_response, self.methods = wanted, response, methods
                self._succeeded(ModelState.SERVING)
            else:
                self._record_failure(response.error.code, response.error.message, ModelState.SETUP_FAILED)
                with contextlib.suppress(WorkerGone):
                    await self._restart_fresh()  # a failed import leaves modules behind: start clean
            return response

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
            process = self._process
            before = process.cpu.sample() if process.cpu else None
            sent = time.perf_counter_ns()
            response = await self._send(
                process.request(call.frame, "call", left, MAX_CALL_ANSWER_BYTES, call.payload), left, before
            )
            if isinstance(response, runner_pb2.CallResponse):
                return response
            vetted(response.call, WORKER_CALL_CODES)
            if response.call.status == SUCCESS and self._failures:
                self._succeeded(ModelState.SERVING)
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

    async def _send(self, exchange, timeout: float, before: CpuSample | None = None):
        """Under the lock: await one exchange with the worker, or a failure response after discarding it.

        `before` is the worker's CPU account when the call was sent: at the deadline it
        tells a starved model (WORKER_STARVED, not counted) from a slow one (MODEL_TIMEOUT).
        """
        assert self._process is not None
        try:
            return await exchange
        except TimeoutError:
            now = self._process.cpu.sample() if self._process.cpu else None
            if before is not None and now is not None and now.starved_since(before):
                message = f"no answer within {timeout:.3f} s while the host gave the model too little CPU; worker restarted"
                self._discard_worker(ErrorCode.WORKER_STARVED, message, blame=False)
                return failure_response(ErrorCode.WORKER_STARVED, message)
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
