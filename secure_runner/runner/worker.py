"""The worker: the only process that ever runs submission code.

Started by the runner as `python -I -m secure_runner.runner.worker` with a
clean environment, a new session and no descriptors but stdin, stdout,
stderr and its payload socket (the descriptors of big arguments' sealed memfds
come on it: runner/shared_payload.py), or forked in that state from its runner's template, a
process started the same way whose first frame says it is the template (runner/template.py). Its configuration (host paths, cgroup paths, limits) is the first frame
on stdin, never an argument: /proc/<pid>/cmdline shows a worker nothing of the
host. Before any submission code is imported it takes private copies of
the protocol pipes (stdin/stdout), points fd 0 at /dev/null and fd 1 at stderr
(so a model's print() cannot corrupt the protocol), and applies every layer of
its sandbox (`runner/sandbox/`). Its first frame is a `hello`: the layers in
force (a protobuf Struct). If a required layer is missing it says why and
exits with SANDBOX_EXIT_CODE without loading anything. It then answers framed
WorkerRequest messages one at a time.

Setup is two requests: `base_class` imports the base class and reports its
allowlist (a BaseClassReport) while the submission's folder is not yet on
sys.path, so that answer is written before any submission code has run in this
process; `setup` then appends the folder to sys.path (after the standard
library, the installed packages and the base paths, which it therefore cannot
shadow), loads the submission and answers a SetupResponse.

It imports only the codec, the framing, discovery, the allowlist rule and the sandbox: never smp,
transport, grpc or a key, and it is never given a path to one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import sys
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from google.protobuf import struct_pb2

from secure_runner import allowlist, codec
from secure_runner.errors import ErrorCode, SecureRunnerError
from secure_runner.runner import discovery, ipc, lifetime, shared_payload, template
from secure_runner.runner.sandbox.policy import LayerResult, SandboxPolicy, WorkerLimits
from secure_runner.v1 import runner_pb2, values_pb2, worker_pb2

SUCCESS = runner_pb2.CALL_STATUS_SUCCESS
FAILURE = runner_pb2.CALL_STATUS_FAILURE


# The folder of the `secure_runner` package this worker was started from (before any submission could be imported).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The largest output a model may return (encoded): the runner refuses a bigger answer unread
# (supervisor.MAX_CALL_ANSWER_BYTES), so a FanOut batch of many models stays within gRPC's message cap.
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
OUTPUT_LIMITS = replace(codec.DEFAULT_LIMITS, max_value_bytes=MAX_OUTPUT_BYTES)
# Exit status of a worker that refused to load code because a required layer is missing.
SANDBOX_EXIT_CODE = 78
# Exit status of a process forked by model code that fell back into the request loop.
FORKED_EXIT_CODE = 70


@dataclass(frozen=True)
class WorkerConfig:
    submission: str
    parent_pid: int
    base_paths: list[str] = field(default_factory=list)
    limits: WorkerLimits = WorkerLimits()
    sandbox: SandboxPolicy = SandboxPolicy()
    cgroup_procs: list[str] = field(default_factory=list)  # made by the runner; the worker joins them
    cgroup_error: str = ""  # why the runner could not make them
    payload_fd: int = -1  # the worker's end of its payload socket: shared payload descriptors come on it

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        data = json.loads(text)
        policy = data["sandbox"]
        return cls(
            data["submission"],
            data["parent_pid"],
            data["base_paths"],
            WorkerLimits(**data["limits"]),
            SandboxPolicy(tuple(policy["allow_missing"]), policy["uid_base"], policy["check_only"], policy["profile"]),
            data["cgroup_procs"],
            data["cgroup_error"],
            data["payload_fd"],
        )


def take_protocol_pipes() -> tuple[int, int]:
    """Move the protocol off fds 0/1 so model code cannot read or write it by accident."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return proto_in, proto_out


def _error(code: ErrorCode, message: str) -> values_pb2.ErrorDetail:
    return values_pb2.ErrorDetail(code=code, message=message)


class Worker:
    def __init__(self, submission: Path, payload_socket: socket.socket) -> None:
        self.submission = submission
        self.payload_socket = payload_socket  # where a big call's sealed payload descriptor comes from
        self.base: type | None = None
        self.instance: object | None = None
        self.methods: frozenset[str] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None  # made on first coroutine: no idle fds

    def report_base_class(self, request: runner_pb2.SetupRequest) -> worker_pb2.BaseClassReport:
        """Step 1 of Setup, before the submission's folder is on sys.path: import the base class and list its methods."""
        if self.base is not None:
            return worker_pb2.BaseClassReport(
                status=FAILURE, error=_error(ErrorCode.SETUP_CONFLICT, "worker is already set up")
            )
        try:
            base = discovery.import_base_class(request.base_classname)
            # Trusted: where Python looks now (the submission is not there yet) and this package's own folder.
            trusted = [Path(entry) for entry in sys.path if os.path.isabs(entry)] + [PACKAGE_ROOT]
            package = request.base_classname.partition(".")[0]
            discovery.check_trusted_origin([package, "secure_runner"], trusted, self.submission)
        except SecureRunnerError as exc:
            return worker_pb2.BaseClassReport(status=FAILURE, error=_error(exc.code, exc.message))
        self.base, self.methods = base, allowlist.declared_methods(base)
        return worker_pb2.BaseClassReport(status=SUCCESS, methods=sorted(self.methods))

    def setup(self, request: runner_pb2.SetupRequest) -> runner_pb2.SetupResponse:
        """Step 2 of Setup: only now may submission code run (its folder goes last on sys.path)."""
        if self.base is None or self.instance is not None:
            return runner_pb2.SetupResponse(
                status=FAILURE, error=_error(ErrorCode.SETUP_CONFLICT, "a worker is set up once, after its base class")
            )
        sys.path.append(str(self.submission))
        try:
            model_class = discovery.find_model_class(self.submission, self.base)
            args, kwargs = codec.decode_arguments(request.arguments, request.kwargs)
        except SecureRunnerError as exc:
            return runner_pb2.SetupResponse(status=FAILURE, error=_error(exc.code, exc.message))
        try:
            self.instance = self._run(model_class(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - untrusted constructor
            traceback.print_exc()
            return runner_pb2.SetupResponse(
                status=FAILURE,
                error=_error(ErrorCode.SETUP_CONSTRUCTOR_FAILED, discovery.describe_exception(exc)),
            )
        return runner_pb2.SetupResponse(status=SUCCESS, class_name=model_class.__qualname__)

    def call(self, request: runner_pb2.CallRequest, shared: dict | None = None) -> runner_pb2.CallResponse:
        """Run one call; `shared`: the bytes of its values that came in its shared payload."""
        if self.instance is None:
            return runner_pb2.CallResponse(status=FAILURE, error=_error(ErrorCode.MODEL_NOT_SET_UP, "call Setup first"))
        if request.method not in self.methods:
            return runner_pb2.CallResponse(
                status=FAILURE,
                error=_error(ErrorCode.METHOD_NOT_ALLOWED, f"{request.method!r} is not declared by the base class"),
            )
        try:
            args, kwargs = codec.decode_arguments(request.arguments, request.kwargs, shared=shared)
        except SecureRunnerError as exc:
            return runner_pb2.CallResponse(status=FAILURE, error=_error(exc.code, exc.message))
        try:
            result = self._run(getattr(self.instance, request.method)(*args, **kwargs))
        except MemoryError as exc:  # the address-space limit: the model asked for more than it may have
            return runner_pb2.CallResponse(
                status=FAILURE, error=_error(ErrorCode.MEMORY_LIMIT, discovery.describe_exception(exc))
            )
        except BaseException as exc:  # noqa: BLE001 - untrusted model code may raise anything
            traceback.print_exc()
            return runner_pb2.CallResponse(
                status=FAILURE, error=_error(ErrorCode.MODEL_RAISED, discovery.describe_exception(exc))
            )
        try:
            output = codec.to_variant(result, limits=OUTPUT_LIMITS)
        except SecureRunnerError as exc:
            code = ErrorCode.MODEL_OUTPUT_TOO_LARGE if exc.code == ErrorCode.VALUE_TOO_LARGE else ErrorCode.MODEL_OUTPUT_INVALID
            return runner_pb2.CallResponse(status=FAILURE, error=_error(code, exc.message))
        return runner_pb2.CallResponse(status=SUCCESS, output=output)

    def _run(self, value: object) -> object:
        """Await coroutines on the worker's own loop, so async models work too."""
        if not inspect.isawaitable(value):
            return value
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(value)

    def _shared_values(self, request: worker_pb2.WorkerRequest) -> dict[int | str, memoryview]:
        if not (request.shared or request.shared_size):
            return {}
        return shared_payload.receive_values(self.payload_socket, request.shared, request.shared_size)

    def handle(self, request: worker_pb2.WorkerRequest) -> worker_pb2.WorkerResponse:
        kind = request.WhichOneof("kind")
        if kind == "call":
            try:  # taken before anything else, so the next call finds only its own descriptor
                shared = self._shared_values(request)
            except SecureRunnerError as exc:
                return worker_pb2.WorkerResponse(call=runner_pb2.CallResponse(status=FAILURE, error=_error(exc.code, exc.message)))
            return worker_pb2.WorkerResponse(call=self.call(request.call, shared))
        if kind == "base_class":
            return worker_pb2.WorkerResponse(base_class=self.report_base_class(request.base_class))
        if kind == "setup":
            return worker_pb2.WorkerResponse(setup=self.setup(request.setup))
        raise ipc.FrameError(f"unknown request kind {kind!r}")


def serve(worker: Worker, proto_in: int, proto_out: int) -> None:
    me = os.getpid()
    while True:
        try:
            frame = ipc.read_frame(proto_in)
        except ipc.FrameError:
            return  # the runner closed the pipe: exit quietly
        response = worker.handle(worker_pb2.WorkerRequest.FromString(frame))
        if os.getpid() != me:  # a process the model forked returned here: it must not answer
            os._exit(FORKED_EXIT_CODE)
        ipc.write_frame(proto_out, response.SerializeToString())


def hello(layers: list[LayerResult], refused: str) -> bytes:
    """The first frame: which layers are in force (read by the runner before any request)."""
    message = struct_pb2.Struct()
    message.update({"refused": refused, "layers": [[r.name, r.active, r.detail] for r in layers]})
    return message.SerializeToString()


def main() -> int:
    from secure_runner.runner.sandbox import bootstrap  # the bindings load here, in the worker only

    try:
        first = ipc.read_frame(0)
    except ipc.FrameError:
        return 0  # the runner went away before it sent the configuration
    if first == template.TEMPLATE_REQUEST:  # this process is its runner's template: it forks workers that run main()
        return template.serve(main)
    config = WorkerConfig.from_json(first.decode())
    lifetime.die_with_parent(config.parent_pid)
    proto_in, proto_out = take_protocol_pipes()
    plan = bootstrap.Plan(
        config.submission, config.base_paths, config.limits, config.sandbox,
        config.cgroup_procs, config.cgroup_error, (proto_in, proto_out, config.payload_fd),
    )
    layers = bootstrap.apply(plan)
    if config.sandbox.check_only:
        ipc.write_frame(proto_out, hello(bootstrap.verify(plan, layers), ""))
        with contextlib.suppress(ipc.FrameError):
            ipc.read_frame(proto_in)  # stay alive until the runner has looked at our cgroup
        return 0
    refused = config.sandbox.refusal(layers)
    ipc.write_frame(proto_out, hello(layers, refused))
    if refused:
        print(f"worker: {refused}", file=sys.stderr)
        return SANDBOX_EXIT_CODE

    def forked_child() -> None:  # children of model code never touch the protocol
        os.close(proto_in)
        os.close(proto_out)
        os.close(config.payload_fd)

    os.register_at_fork(after_in_child=forked_child)
    sys.path.extend(config.base_paths)  # after the standard library and installed packages; the submission comes last
    serve(Worker(Path(config.submission), socket.socket(fileno=config.payload_fd)), proto_in, proto_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
