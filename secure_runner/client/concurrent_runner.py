"""The coordinator's fan-out: keep the crunch's model list live, call them all at once.

`DynamicSubclassModelConcurrentRunner` keeps the constructor arguments and the
`init()` / `sync()` / `call()` shape of the reference client so existing
coordinator code runs unchanged apart from `security=`. The model list comes
from the orchestrator over mutual TLS (the orchestrator's identity is pinned);
each model is then reached directly, its runner's identity pinned too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence

import grpc

from secure_runner.client.remote_model import CALL_RPC, ModelState, RemoteModel
from secure_runner.client.results import CallResult, ModelIdentity
from secure_runner.client.security import CallSigner, CoordinatorSecurity
from secure_runner.errors import ConfigError, ErrorCode, RequestError
from secure_runner.smp.identity import PeerIdentity, Role, validate_id
from secure_runner.smp.token import MAX_AUDIENCE, model_id_field
from secure_runner.transport import tls
from secure_runner.transport.registry_file import RegistryFile
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import orchestrator_pb2, orchestrator_pb2_grpc, runner_pb2, values_pb2

log = logging.getLogger(__name__)

ORCHESTRATOR_ID = "orchestrator"
REPORT_RPC = "/secure_runner.v1.Orchestrator/ReportFailure"
RESYNC_BACKOFF_SECONDS = (0.5, 1, 2, 5, 10)
REPORT_ATTEMPTS = 20
CLOSE_GRACE_SECONDS = 5.0


class DynamicSubclassModelConcurrentRunner:
    def __init__(
        self,
        timeout: float,
        crunch_id: str,
        host: str,
        port: int,
        base_classname: str,
        max_consecutive_failures: int = 3,
        max_consecutive_timeouts: int = 3,
        instance_args: Sequence[values_pb2.Argument] = (),
        instance_kwargs: Sequence[values_pb2.KwArgument] = (),
        *,
        security: CoordinatorSecurity,
        connect_timeout: float = 10.0,
        setup_timeout: float = 60.0,
    ) -> None:
        self.timeout = timeout
        self.crunch_id = validate_id(crunch_id, "crunch id")
        self.base_classname = base_classname
        self.max_consecutive_failures = max_consecutive_failures
        self.max_consecutive_timeouts = max_consecutive_timeouts
        self._instance_args = list(instance_args)
        self._instance_kwargs = list(instance_kwargs)
        self._security = security
        self._connect_timeout = connect_timeout
        self._setup_timeout = setup_timeout
        self._signer = CallSigner(security, crunch_id)
        self._registry = RegistryFile(security.registry)
        self._address = f"{host}:{port}"
        self._models: dict[str, RemoteModel] = {}
        self._dropped: set[tuple[str, str]] = set()  # (model id, deployment id) disconnected by the limits
        self._setups: dict[str, asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()
        self._channel: grpc.aio.Channel | None = None
        self._stream = None

    # -- model list -------------------------------------------------------------------

    def _orchestrator_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            server_name = PeerIdentity.make(self.crunch_id, Role.ORCHESTRATOR, ORCHESTRATOR_ID).tls_server_name
            self._channel = grpc.aio.secure_channel(
                self._address, tls.channel_credentials(self._security.tls), options=tls.channel_options(server_name)
            )
        return self._channel

    def _open_stream(self):
        stub = orchestrator_pb2_grpc.OrchestratorStub(self._orchestrator_channel())
        return stub.WatchModels(orchestrator_pb2.WatchModelsRequest(crunch_id=self.crunch_id), wait_for_ready=True)

    async def init(self) -> None:
        """Fetch the model list and set up every model, waiting at most `connect_timeout`.

        Models that are not ready by then keep connecting in the background.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        self._stream = self._open_stream()
        snapshot = await asyncio.wait_for(self._stream.read(), self._connect_timeout)
        if snapshot is grpc.aio.EOF:
            raise RequestError(ErrorCode.UNREACHABLE, "orchestrator closed the model list stream")
        self._apply(snapshot)
        pending = [t for t in self._setups.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(deadline - loop.time(), 0))

    async def sync(self) -> None:
        """Apply every model-list update, reconnecting to the orchestrator when needed. Runs forever."""
        failures = 0
        while True:
            try:
                if self._stream is None:
                    self._stream = self._open_stream()
                # read(), not `async for`: init() already read from this stream, and
                # grpc.aio forbids mixing the two styles on one call.
                while (snapshot := await self._stream.read()) is not grpc.aio.EOF:
                    failures = 0
                    self._apply(snapshot)
                lost = "stream ended"
            except grpc.aio.AioRpcError as exc:
                lost = exc.code().name
            delay = RESYNC_BACKOFF_SECONDS[min(failures, len(RESYNC_BACKOFF_SECONDS) - 1)]
            failures += 1
            log.warning("model list stream lost (%s); retrying in %.1f s", lost, delay)
            self._stream = None
            await asyncio.sleep(delay)

    def _apply(self, snapshot: orchestrator_pb2.ModelList) -> None:
        running = {
            info.model_id: info for info in snapshot.models if info.state == orchestrator_pb2.MODEL_STATE_RUNNING
        }
        for model_id in list(self._models):
            model = self._models[model_id]
            info = running.get(model_id)
            if info is None or info.deployment_id != model.identity.deployment_id or info.address != model.address:
                self._forget(model_id)
        for model_id, info in running.items():
            if model_id not in self._models and (model_id, info.deployment_id) not in self._dropped:
                self._connect(info)

    def _connect(self, info: orchestrator_pb2.ModelInfo) -> None:
        try:
            identity = ModelIdentity(
                validate_id(info.model_id, "model id"),
                info.model_name,
                info.cruncher_id,
                info.cruncher_name,
                info.deployment_id,
            )
        except ConfigError as exc:
            log.warning("ignoring model with invalid id: %s", exc)
            return
        model = RemoteModel(
            identity,
            info.address,
            info.runner_delegation,
            self.crunch_id,
            self._security,
            self._signer,
            self._registry.current,
        )
        self._models[info.model_id] = model
        self._setups[info.model_id] = asyncio.create_task(
            model.setup(self.base_classname, self._instance_args, self._instance_kwargs, self._setup_timeout)
        )

    def _forget(self, model_id: str) -> RemoteModel:
        model = self._models.pop(model_id)
        task = self._setups.pop(model_id, None)
        if task is not None:
            task.cancel()
        model.state = ModelState.DISCONNECTED
        self._background(model.close())
        return model

    @property
    def models(self) -> list[ModelIdentity]:
        """The models a call would target right now."""
        return [m.identity for m in self._models.values()]

    # -- calls ------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        arguments: Sequence[values_pb2.Argument] | None = None,
        kwargs: Sequence[values_pb2.KwArgument] | None = None,
        models: Iterable[str] | None = None,
    ) -> dict[ModelIdentity, CallResult]:
        """Call `method` on every model (or the ids in `models`); one result per model."""
        wanted = None if models is None else set(models)
        targets = [m for m in self._models.values() if wanted is None or m.model_id in wanted]
        ready = [m for m in targets if m.state is ModelState.READY]
        if ready and all(method not in m.methods for m in ready):
            raise RequestError(
                ErrorCode.METHOD_NOT_ALLOWED, f"{method!r} is not a method of {self.base_classname}"
            )
        shared = runner_pb2.CallRequest(method=method, arguments=arguments or (), kwargs=kwargs or ())
        shared_bytes = shared.SerializeToString()
        # One signature per MAX_AUDIENCE models, not one per model.
        tokens: dict[str, bytes] = {}
        for start in range(0, len(ready), MAX_AUDIENCE):
            chunk = [m.model_id for m in ready[start : start + MAX_AUDIENCE]]
            token = self._signer.sign(audience=chunk, rpc=CALL_RPC, method=method, shared_body=shared_bytes)
            tokens.update(dict.fromkeys(chunk, token))
        results = await asyncio.gather(
            *(m.call(shared_bytes, tokens.get(m.model_id, b""), self.timeout) for m in targets)
        )
        for model, result in zip(targets, results, strict=True):
            model.record(result)
            self._enforce_limits(model)
        return {result.model: result for result in results}

    def _enforce_limits(self, model: RemoteModel) -> None:
        if (
            model.consecutive_failures >= self.max_consecutive_failures
            or model.consecutive_timeouts >= self.max_consecutive_timeouts
        ):
            log.warning(
                "disconnecting model %s: %d consecutive failures, %d consecutive timeouts",
                model.model_id,
                model.consecutive_failures,
                model.consecutive_timeouts,
            )
            self._dropped.add((model.model_id, model.identity.deployment_id))
            self._forget(model.model_id)
            self._background(self._report_failure(model))

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _report_failure(self, model: RemoteModel) -> None:
        """Tell the orchestrator to stop the model; retried with backoff until it answers."""
        shared = orchestrator_pb2.FailureReport(
            deployment_id=model.identity.deployment_id,
            reason="MAX_CONSECUTIVE_TIMEOUTS" if model.consecutive_timeouts >= self.max_consecutive_timeouts
            else "MAX_CONSECUTIVE_FAILURES",
            consecutive_failures=model.consecutive_failures,
            consecutive_timeouts=model.consecutive_timeouts,
        ).SerializeToString()
        report = self._orchestrator_channel().unary_unary(
            REPORT_RPC, response_deserializer=orchestrator_pb2.FailureReportAck.FromString
        )
        for attempt in range(REPORT_ATTEMPTS):
            token = self._signer.sign(audience=[model.model_id], rpc=REPORT_RPC, method="", shared_body=shared)
            try:
                ack = await report(model_id_field(model.model_id) + shared, metadata=((TOKEN_KEY, token),), timeout=5)
            except grpc.aio.AioRpcError as exc:
                delay = RESYNC_BACKOFF_SECONDS[min(attempt, len(RESYNC_BACKOFF_SECONDS) - 1)]
                log.warning("failure report for %s not delivered (%s); retrying in %.1f s", model.model_id, exc.code().name, delay)
                await asyncio.sleep(delay)
                continue
            log.info("failure report for %s delivered; stopped=%s", model.model_id, ack.stopped)
            return
        log.error("failure report for %s abandoned after %d attempts", model.model_id, REPORT_ATTEMPTS)

    async def close(self) -> None:
        for model_id in list(self._models):
            self._forget(model_id)
        if self._closing:  # channel closes and failure reports still being delivered
            _, pending = await asyncio.wait(set(self._closing), timeout=CLOSE_GRACE_SECONDS)
            for task in pending:
                task.cancel()
        if self._stream is not None:
            self._stream.cancel()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
