"""One remote model as the coordinator sees it: a channel, its setup, its counters.

Before any request leaves, the runner's identity is checked twice: the TLS
server name is pinned to `<model-id>.runner.<crunch>.invalid` (a certificate
from the crunch CA for exactly that model), and the cruncher's signed
delegation must bind the TLS key the runner presents (SMP-30..35, checked
against the coordinator's registry). A runner that fails either is reported as
an auth failure for that model only. Requests are serialized here and signed
over their exact bytes; gRPC sends those bytes unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from enum import StrEnum

import grpc

from secure_runner import codec
from secure_runner.client.results import CallResult, CallStatus, ModelIdentity
from secure_runner.client.security import CallSigner, CoordinatorSecurity
from secure_runner.errors import AuthError, CodecError, ErrorCode, RequestError
from secure_runner.smp import rules
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.registry import Registry
from secure_runner.smp.token import model_id_field
from secure_runner.transport import tls
from secure_runner.transport.status import TOKEN_KEY, reason_of
from secure_runner.v1 import runner_pb2, values_pb2

log = logging.getLogger(__name__)

SETUP_RPC = "/secure_runner.v1.ModelRunner/Setup"
CALL_RPC = "/secure_runner.v1.ModelRunner/Call"
# Reasons that are the model's own doing; only these count toward disconnection.
MODEL_FAULTS = frozenset(
    {
        ErrorCode.MODEL_RAISED,
        ErrorCode.MODEL_OUTPUT_INVALID,
        ErrorCode.WORKER_CRASHED,
        ErrorCode.WORKER_PROTOCOL,
        ErrorCode.MEMORY_LIMIT,
        ErrorCode.CPU_LIMIT,
        ErrorCode.SETUP_NO_CANDIDATE,
        ErrorCode.SETUP_MANY_CANDIDATES,
        ErrorCode.SETUP_IMPORT_FAILED,
        ErrorCode.SETUP_CONSTRUCTOR_FAILED,
    }
)
_STATUS = {
    runner_pb2.CALL_STATUS_SUCCESS: CallStatus.SUCCESS,
    runner_pb2.CALL_STATUS_FAILURE: CallStatus.FAILURE,
    runner_pb2.CALL_STATUS_TIMEOUT: CallStatus.TIMEOUT,
}


class ModelState(StrEnum):
    CONNECTING = "CONNECTING"
    IDENTITY_REJECTED = "IDENTITY_REJECTED"
    READY = "READY"
    SETUP_FAILED = "SETUP_FAILED"
    UNREACHABLE = "UNREACHABLE"
    DISCONNECTED = "DISCONNECTED"


class RemoteModel:
    def __init__(
        self,
        identity: ModelIdentity,
        address: str,
        delegation: bytes,
        crunch_id: str,
        security: CoordinatorSecurity,
        signer: CallSigner,
        registry: Callable[[], Registry],
    ) -> None:
        self.identity = identity
        self.address = address
        self._delegation = delegation
        self._crunch_id = crunch_id
        self._security = security
        self._registry = registry
        self.state = ModelState.CONNECTING
        self.methods: frozenset[str] = frozenset()
        self.setup_error: tuple[str, str] | None = None
        self.consecutive_failures = 0
        self.consecutive_timeouts = 0
        self._signer = signer
        self._server_name = PeerIdentity.make(crunch_id, Role.RUNNER, identity.model_id).tls_server_name
        self._channel = grpc.aio.secure_channel(
            address, tls.channel_credentials(security.tls), options=tls.channel_options(self._server_name)
        )
        self._setup = self._channel.unary_unary(SETUP_RPC, response_deserializer=runner_pb2.SetupResponse.FromString)
        self._call = self._channel.unary_unary(CALL_RPC, response_deserializer=runner_pb2.CallResponse.FromString)

    @property
    def model_id(self) -> str:
        return self.identity.model_id

    async def verify_identity(self) -> None:
        """SMP-30..35 on the certificate the runner presents, before any request is sent."""
        host, _, port = self.address.rpartition(":")
        der = await asyncio.to_thread(
            tls.fetch_server_certificate, host, int(port), self._security.tls, self._server_name
        )
        rules.verify_delegation(
            self._delegation,
            registry=self._registry(),
            crunch_id=self._crunch_id,
            model_id=self.model_id,
            presented_spki_sha256=tls.spki_sha256(der),
            now=int(time.time()),
        )

    async def setup(
        self,
        base_classname: str,
        arguments: Sequence[values_pb2.Argument],
        kwargs: Sequence[values_pb2.KwArgument],
        timeout: float,
    ) -> None:
        """Check the runner's identity, then set the model up; the outcome is recorded in `state`."""
        try:
            await self.verify_identity()
        except (AuthError, RequestError) as exc:
            self.state = ModelState.IDENTITY_REJECTED if isinstance(exc, AuthError) else ModelState.UNREACHABLE
            self.setup_error = (exc.code, exc.message)
            log.warning("model %s at %s: runner identity not verified: %s", self.model_id, self.address, exc)
            return
        shared = runner_pb2.SetupRequest(
            base_classname=base_classname, arguments=arguments, kwargs=kwargs
        ).SerializeToString()
        token = self._signer.sign(audience=[self.model_id], rpc=SETUP_RPC, method="", shared_body=shared)
        try:
            response = await self._setup(
                model_id_field(self.model_id) + shared,
                metadata=((TOKEN_KEY, token),),
                timeout=timeout,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            self.state = ModelState.UNREACHABLE
            self.setup_error = (reason_of(exc) or ErrorCode.UNREACHABLE, exc.details() or exc.code().name)
            log.warning("model %s at %s: setup failed: %s", self.model_id, self.address, self.setup_error)
            return
        if response.status == runner_pb2.CALL_STATUS_SUCCESS:
            self.state, self.methods, self.setup_error = ModelState.READY, frozenset(response.methods), None
        else:
            self.state = ModelState.SETUP_FAILED
            self.setup_error = (response.error.code, response.error.message)
            log.warning("model %s: setup refused: %s", self.model_id, self.setup_error)

    async def call(self, shared: bytes, token: bytes, timeout: float) -> CallResult:
        """One call: the fan-out's shared request bytes and token; always returns a result."""
        if self.state is not ModelState.READY:
            code, message = self.setup_error or (ErrorCode.UNREACHABLE, f"model is {self.state}")
            return self._result(CallStatus.FAILURE, reason=code, message=message)
        body = model_id_field(self.model_id) + shared
        started = time.perf_counter()
        try:
            response = await self._call(body, metadata=((TOKEN_KEY, token),), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            latency = _micros(started)
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return self._result(CallStatus.TIMEOUT, latency, ErrorCode.MODEL_TIMEOUT, "deadline exceeded")
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return self._result(CallStatus.FAILURE, latency, ErrorCode.UNREACHABLE, exc.details() or "")
            return self._result(CallStatus.FAILURE, latency, reason_of(exc) or ErrorCode.CALL_REFUSED, exc.details() or "")
        latency = _micros(started)
        status = _STATUS.get(response.status)
        if status is None:
            return self._result(CallStatus.FAILURE, latency, ErrorCode.WORKER_PROTOCOL, "runner sent no status")
        if status is not CallStatus.SUCCESS:
            return self._result(status, latency, response.error.code, response.error.message)
        try:
            output = codec.from_variant(response.output)
        except CodecError as exc:
            return self._result(CallStatus.FAILURE, latency, ErrorCode.MODEL_OUTPUT_INVALID, exc.message)
        return self._result(CallStatus.SUCCESS, latency, output=output)

    def _result(self, status: CallStatus, latency_us: int = 0, reason: str = "", message: str = "", output=None):
        return CallResult(self.identity, status, output, latency_us, str(reason), message)

    def record(self, result: CallResult) -> None:
        """Update the consecutive counters: only the model's own faults count."""
        if result.status is CallStatus.SUCCESS:
            self.consecutive_failures = self.consecutive_timeouts = 0
        elif result.status is CallStatus.TIMEOUT:
            self.consecutive_timeouts += 1
        elif result.reason in MODEL_FAULTS:
            self.consecutive_failures += 1

    async def close(self) -> None:
        await self._channel.close()


def _micros(started: float) -> int:
    return int((time.perf_counter() - started) * 1_000_000)
