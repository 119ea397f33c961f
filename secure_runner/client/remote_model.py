"""One remote model as the coordinator sees it: its node's channel, its connection, its counters.

Before any request leaves, the runner's identity is checked twice: the TLS
server name is pinned to `<node-id>.runner.<crunch>.invalid` (a certificate
from the crunch CA for exactly the runner process hosting it; a runner hosting
one model is named after it), and the cruncher's signed
delegation must bind the TLS key the runner presents (SMP-30..35, checked
against the coordinator's registry). A runner that fails either is reported as
an auth failure for that model only. Setup requests are serialized and signed
here, call requests by the concurrent runner (one token per fan-out), each over
its exact bytes; gRPC sends those bytes unchanged.

Connecting (identity check, then Setup) runs in the background and is retried
with backoff while the runner cannot be reached, so a call never waits for a
slow or dead model: a model that is not ready is answered at once without
sending anything. After an outcome that makes the runner replace the model's
worker (a timeout, a crash, a limit), the model cools down: calls skip it until
its runner's health service says it serves again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from enum import StrEnum

import grpc
from grpc_health.v1 import health_pb2

from secure_runner import codec
from secure_runner.client.results import (
    MODEL_FAULTS,
    RESTARTING_FAULTS,
    CallResult,
    CallStatus,
    Fault,
    ModelIdentity,
)
from secure_runner.client.fan_out import ModelFlight, NodeFlight, rpc_error
from secure_runner.client.node_channel import SETUP_RPC, NodeChannel
from secure_runner.client.security import BACKDATE_SECONDS, CallSigner, CoordinatorSecurity
from secure_runner.errors import AuthError, CodecError, ConfigError, ErrorCode, RequestError, SecureRunnerError
from secure_runner.registry.delegation import verify_runner_delegation
from secure_runner.smp.registry import RegistrySnapshot
from secure_runner.smp.token import model_id_field
from secure_runner.transport import tls
from secure_runner.transport.status import TOKEN_KEY, reason_of
from secure_runner.v1 import runner_pb2, values_pb2

log = logging.getLogger(__name__)

# Delays between connection attempts while a runner cannot be reached (the last one repeats).
RECONNECT_BACKOFF_SECONDS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
IDENTITY_TIMEOUT_SECONDS = 5.0
# Health checks of a model cooling down: the first after this delay, then doubling up to the cap.
PROBE_FIRST_SECONDS = 0.02
PROBE_MAX_SECONDS = 0.5
_STATUS = {
    runner_pb2.CALL_STATUS_SUCCESS: CallStatus.SUCCESS,
    runner_pb2.CALL_STATUS_FAILURE: CallStatus.FAILURE,
    runner_pb2.CALL_STATUS_TIMEOUT: CallStatus.TIMEOUT,
}
# Refusals meaning the runner no longer has our Setup (it restarted in place), or serves
# another TLS key than the one checked (renewed with new keys): check it and set up again.
_SETUP_LOST = frozenset({ErrorCode.METHOD_NOT_ALLOWED, ErrorCode.MODEL_NOT_SET_UP, ErrorCode.TOKEN_WRONG_DESTINATION})


def backoff_delay(schedule: Sequence[float], attempt: int) -> float:
    """The delay before retry `attempt` (0-based): the schedule's entry, its last one from then on."""
    return schedule[min(attempt, len(schedule) - 1)]

class ModelState(StrEnum):
    CONNECTING = "CONNECTING"  # identity check and Setup in progress (first time, or after losing the runner)
    READY = "READY"
    COOLING_DOWN = "COOLING_DOWN"  # its worker is restarting after a fault; skipped until it serves again
    UNREACHABLE = "UNREACHABLE"  # the last attempt failed; retrying with backoff
    IDENTITY_REJECTED = "IDENTITY_REJECTED"  # the runner's identity was refused; retrying with backoff
    SETUP_FAILED = "SETUP_FAILED"  # the submission's own setup failed: final
    DISCONNECTED = "DISCONNECTED"  # dropped: over the limits, or gone from the model list

    @property
    def settled(self) -> bool:
        """Nothing in progress that would change the model's state soon."""
        return self in (ModelState.READY, ModelState.SETUP_FAILED, ModelState.DISCONNECTED)


class InFlight:
    """One call handed to gRPC, and its latency: from gRPC's send step to its completion callback."""

    def __init__(self, call: grpc.aio.UnaryUnaryCall) -> None:
        self.call = call
        self.started = self.ended = time.perf_counter()
        # gRPC queued its send step when the call was made; this callback runs right after it.
        asyncio.get_running_loop().call_soon(self._start)
        call.add_done_callback(self._end)

    def _start(self) -> None:
        self.started = time.perf_counter()

    def _end(self, _call) -> None:
        self.ended = time.perf_counter()

    @property
    def latency_us(self) -> int:
        return max(int((self.ended - self.started) * 1_000_000), 0)

    async def outcome(self) -> runner_pb2.CallResponse | Exception:
        """The response, or what went wrong: never raises, so one call cannot sink the fan-out."""
        try:
            return await self.call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller cancelled the fan-out
            # The call itself was cancelled: its channel closed under it (the model left the list).
            return rpc_error(grpc.StatusCode.CANCELLED, "the model's channel was closed")
        except Exception as exc:  # noqa: BLE001 - an AioRpcError, or a bug: either way a result, not a crash
            return exc


class RemoteModel:
    def __init__(
        self,
        identity: ModelIdentity,
        node: NodeChannel,
        delegation: bytes,
        crunch_id: str,
        security: CoordinatorSecurity,
        signer: CallSigner,
        registry: Callable[[], RegistrySnapshot],
        identity_executor: Executor | None = None,
    ) -> None:
        self.identity = identity
        self.node = node  # the runner hosting it: its channel, shared with the node's other models
        self._delegation = delegation
        self._crunch_id = crunch_id
        self._security = security
        self._registry = registry
        self._identity_executor = identity_executor
        self._state = ModelState.CONNECTING
        self.methods: frozenset[str] = frozenset()
        self.setup_error: tuple[str, str] | None = None
        self.consecutive_failures = 0
        self.consecutive_timeouts = 0
        self.last_fault: CallResult | None = None
        self.attempts = 0  # connection attempts finished
        self._cooling = False
        self._connecting: asyncio.Task | None = None
        self._setup_args: tuple | None = None
        self._probing: asyncio.Task | None = None
        self._signer = signer

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def model_id(self) -> str:
        return self.identity.model_id

    @property
    def state(self) -> ModelState:
        if self._state is ModelState.READY and self._cooling:
            return ModelState.COOLING_DOWN
        return self._state

    # -- connecting -------------------------------------------------------------------

    async def verify_identity(self) -> None:
        """SMP-30..35 (or EN-1..7 for the reference's enrolment form) on the certificate the runner
        presents, before any request is sent."""
        host, _, port = self.address.rpartition(":")
        der = await asyncio.get_running_loop().run_in_executor(
            self._identity_executor,
            tls.fetch_server_certificate,
            host, int(port), self._security.tls, self.node.server_name, IDENTITY_TIMEOUT_SECONDS,
        )
        presented = tls.spki_sha256(der)
        verify_runner_delegation(
            self._delegation,
            registry=self._registry(),
            crunch_id=self._crunch_id,
            model_id=self.model_id,
            presented_spki_sha256=presented,
            now=int(time.time()),
        )
        self.node.destination = presented  # what tokens to this runner name in `dst`

    def connect(
        self,
        base_classname: str,
        arguments: Sequence[values_pb2.Argument],
        kwargs: Sequence[values_pb2.KwArgument],
        timeout: float,
    ) -> asyncio.Task:
        """Start (or keep) connecting in the background, retrying with backoff until set up."""
        if self._connecting is None or self._connecting.done():
            self._setup_args = (base_classname, arguments, kwargs, timeout)
            self._connecting = asyncio.create_task(self._connect_until_settled())
        return self._connecting

    def reconnect(self, why: str) -> None:
        """The runner was lost or forgot our Setup: connect again in the background."""
        if self._setup_args is None or self._state is ModelState.DISCONNECTED:
            return
        if self._connecting is not None and not self._connecting.done():
            return
        log.warning("model %s at %s: reconnecting (%s)", self.model_id, self.address, why)
        self._state, self.setup_error = ModelState.CONNECTING, (ErrorCode.UNREACHABLE, f"reconnecting: {why}")
        self.connect(*self._setup_args)

    async def _connect_until_settled(self) -> None:
        attempt = 0
        while True:
            settled = await self.setup(*self._setup_args)
            self.attempts += 1
            if settled:
                return
            await asyncio.sleep(backoff_delay(RECONNECT_BACKOFF_SECONDS, attempt))
            attempt += 1

    async def setup(
        self,
        base_classname: str,
        arguments: Sequence[values_pb2.Argument],
        kwargs: Sequence[values_pb2.KwArgument],
        timeout: float,
    ) -> bool:
        """Check the runner's identity, then set the model up. True when settled (ready, or failed for good)."""
        try:
            await self.verify_identity()
        except (AuthError, RequestError, ConfigError, ValueError) as exc:
            rejected = isinstance(exc, AuthError)
            self._state = ModelState.IDENTITY_REJECTED if rejected else ModelState.UNREACHABLE
            code = exc.code if isinstance(exc, SecureRunnerError) else ErrorCode.UNREACHABLE
            self.setup_error = (code, getattr(exc, "message", None) or f"bad runner address {self.address!r}")
            log.warning("model %s at %s: runner identity not verified: %s", self.model_id, self.address, exc)
            return False
        shared = runner_pb2.SetupRequest(
            base_classname=base_classname, arguments=arguments, kwargs=kwargs
        ).SerializeToString()
        try:
            try:
                response = await self._send_setup(shared, timeout)
            except grpc.aio.AioRpcError as exc:
                if reason_of(exc) != ErrorCode.TOKEN_ISSUED_BEFORE_START:
                    raise
                # The runner started less than BACKDATE_SECONDS ago (our tokens are dated that far back).
                await asyncio.sleep(BACKDATE_SECONDS)
                response = await self._send_setup(shared, timeout)
        except grpc.aio.AioRpcError as exc:
            self._state = ModelState.UNREACHABLE
            self.setup_error = (reason_of(exc) or ErrorCode.UNREACHABLE, exc.details() or exc.code().name)
            log.warning("model %s at %s: setup failed: %s", self.model_id, self.address, self.setup_error)
            return False
        if response.status == runner_pb2.CALL_STATUS_SUCCESS:
            self._state, self.methods, self.setup_error = ModelState.READY, frozenset(response.methods), None
            return True
        self.setup_error = (response.error.code, response.error.message)
        log.warning("model %s: setup refused: %s", self.model_id, self.setup_error)
        if response.error.code in MODEL_FAULTS or response.status == runner_pb2.CALL_STATUS_TIMEOUT:
            self._state = ModelState.SETUP_FAILED  # the submission's own doing: retrying would not help
            return True
        self._state = ModelState.UNREACHABLE  # the host's problem (sandbox, base class): retried
        return False

    def _send_setup(self, shared: bytes, timeout: float):
        token = self._signer.sign(
            audience=[self.model_id], destinations=[self.node.destination], cert_sha256=self.node.cert_sha256,
            rpc=SETUP_RPC, method="", shared_body=shared,
        )
        return self.node.setup(
            model_id_field(self.model_id) + shared, metadata=((TOKEN_KEY, token),), timeout=timeout, wait_for_ready=True
        )

    # -- calling ----------------------------------------------------------------------

    def skipped(self) -> CallResult | None:
        """The result of a call that is not sent because the model is not ready, else None."""
        state = self.state
        if state is ModelState.READY:
            return None
        if state is ModelState.COOLING_DOWN:
            return self._result(CallStatus.FAILURE, 0, ErrorCode.COOLING_DOWN, "worker restarting after a fault")
        if state is ModelState.SETUP_FAILED:  # the model's fault, counted like a failed (or timed-out) call
            code, message = self.setup_error
            status = CallStatus.TIMEOUT if code == ErrorCode.MODEL_TIMEOUT else CallStatus.FAILURE
            return self._result(status, 0, code, message)
        code, message = self.setup_error or (ErrorCode.UNREACHABLE, f"model is {state.lower()}")
        return self._result(CallStatus.FAILURE, 0, code, message)

    def send(self, shared: bytes, token: bytes, timeout: float) -> InFlight:
        """Hand one call to gRPC: the fan-out's request bytes for this model and their token."""
        body = model_id_field(self.model_id) + shared
        return InFlight(self.node.call(body, metadata=((TOKEN_KEY, token),), timeout=timeout))

    def send_fan_out(self, body: bytes, token: bytes, timeout: float, model_ids: Sequence[str]) -> NodeFlight:
        """Hand one FanOut for `model_ids` (all on this model's node) to gRPC, on the node's channel."""
        return NodeFlight(self.node.fan_out(body, metadata=((TOKEN_KEY, token),), timeout=timeout), model_ids)

    def result_of(self, flight: InFlight | ModelFlight, outcome: runner_pb2.CallResponse | Exception) -> CallResult:
        latency = flight.latency_us
        if isinstance(outcome, grpc.aio.AioRpcError):
            status, reason, message = _classify(outcome)
            return self._result(status, latency, reason, message)
        if isinstance(outcome, Exception):
            log.error("model %s: call failed in the client: %r", self.model_id, outcome)
            return self._result(CallStatus.FAILURE, latency, ErrorCode.INTERNAL, f"client error: {outcome!r}"[:500])
        status = _STATUS.get(outcome.status)
        if status is None:
            return self._result(CallStatus.FAILURE, latency, ErrorCode.WORKER_PROTOCOL, "runner sent no status")
        model_latency = min(outcome.model_latency_us, latency)
        if status is not CallStatus.SUCCESS:
            return self._result(status, latency, outcome.error.code, outcome.error.message, model_latency=model_latency)
        try:
            output = codec.from_variant(outcome.output)
        except CodecError as exc:
            return self._result(
                CallStatus.FAILURE, latency, ErrorCode.MODEL_OUTPUT_INVALID, exc.message, model_latency=model_latency
            )
        return self._result(CallStatus.SUCCESS, latency, output=output, model_latency=model_latency)

    def _result(
        self, status: CallStatus, latency: int = 0, reason: str = "", message: str = "", output=None, model_latency: int = 0
    ) -> CallResult:
        return CallResult(self.identity, status, output, latency, str(reason), message, model_latency)

    def record(self, result: CallResult, *, sent: bool) -> None:
        """Count the model's own faults; for a call that was sent, react to what it says about the runner."""
        if result.status is CallStatus.SUCCESS:
            self.consecutive_failures = self.consecutive_timeouts = 0
        elif result.fault is Fault.MODEL:
            self.last_fault = result
            if result.status is CallStatus.TIMEOUT:
                self.consecutive_timeouts += 1
            else:
                self.consecutive_failures += 1
        if not sent:
            return
        if result.reason in RESTARTING_FAULTS:  # the runner is replacing the worker
            self._cool_down()
        elif result.reason == ErrorCode.UNREACHABLE or result.reason in _SETUP_LOST:
            self.reconnect(f"{result.reason}: {result.message}")

    def _cool_down(self) -> None:
        self._cooling = True
        if self._probing is None or self._probing.done():
            self._probing = asyncio.create_task(self._probe_until_serving())

    async def _probe_until_serving(self) -> None:
        """Ask the runner's health service until it says the model serves again."""
        delay = PROBE_FIRST_SECONDS
        request = health_pb2.HealthCheckRequest(service=self.model_id)
        while self._cooling:
            await asyncio.sleep(delay)
            delay = min(delay * 2, PROBE_MAX_SECONDS)
            try:
                response = await self.node.health(request, timeout=max(delay, 1.0))
            except grpc.aio.AioRpcError:
                continue
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                self._cooling = False

    def close(self) -> None:
        """Stop connecting and probing; the caller releases the node channel."""
        self._state = ModelState.DISCONNECTED
        for task in (self._connecting, self._probing):
            if task is not None:
                task.cancel()


def _classify(exc: grpc.aio.AioRpcError) -> tuple[CallStatus, str, str]:
    """Status, reason and message of a call that gRPC ended with an error."""
    code, reason, details = exc.code(), reason_of(exc), exc.details() or exc.code().name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CallStatus.TIMEOUT, ErrorCode.MODEL_TIMEOUT, "no answer before the deadline"
    if reason:
        return CallStatus.FAILURE, reason, details
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CallStatus.FAILURE, ErrorCode.MESSAGE_TOO_LARGE, details
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return CallStatus.FAILURE, ErrorCode.UNREACHABLE, details
    return CallStatus.FAILURE, ErrorCode.CALL_REFUSED, f"{code.name}: {details}"
