"""The coordinator's fan-out: keep the crunch's model list live, call them all at once.

`DynamicSubclassModelConcurrentRunner` keeps the constructor arguments and the
`init()` / `sync()` / `call()` shape of the reference client so existing
coordinator code runs unchanged apart from `security=`. The model list comes
from the orchestrator over mutual TLS (the orchestrator's identity is pinned);
each model is then reached directly, its runner's identity pinned too.

Reliability rules (DESIGN.md section 1):
- every targeted model gets exactly one result per call (results.py says which
  reasons blame the model and which the infrastructure); coordinator mistakes
  raise `RequestError` before anything is sent and blame no model;
- nothing waits on a slow or dead model: connecting and reconnecting run in the
  background, a model that is not ready is answered at once, `init()` returns
  within `connect_timeout`;
- the model list is applied live: joins, leaves, restarts and new deployments;
  news of a deployment that was already replaced or stopped is ignored; a lost
  orchestrator is reconnected with backoff while the known models keep serving;
- a model over its limits is dropped and reported to the orchestrator, and the
  report is retried until it is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc

from secure_runner import allowlist, codec
from secure_runner.client.fan_out import fan_out_request
from secure_runner.client.node_channel import CALL_RPC, FANOUT_RPC, NodeChannels, channel_options
from secure_runner.client.remote_model import IDENTITY_TIMEOUT_SECONDS, ModelState, RemoteModel, backoff_delay
from secure_runner.client.results import CallResult, CallStatus, ModelIdentity
from secure_runner.client.security import BACKDATE_SECONDS, CallSigner, CoordinatorSecurity
from secure_runner.errors import AuthError, CodecError, ConfigError, ErrorCode, RequestError
from secure_runner.smp.identity import PeerIdentity, Role, validate_id
from secure_runner.smp.registry import ModelEntry
from secure_runner.smp.token import MAX_AUDIENCE, MAX_DESTINATIONS, model_id_field
from secure_runner.transport import tls
from secure_runner.transport.registry_file import open_registry_source
from secure_runner.transport.status import TOKEN_KEY, reason_of
from secure_runner.v1 import orchestrator_pb2, runner_pb2, values_pb2

if TYPE_CHECKING:
    from secure_runner.client.metrics import ClientMetrics

log = logging.getLogger(__name__)

ORCHESTRATOR_ID = "orchestrator"
REPORT_RPC = "/secure_runner.v1.Orchestrator/ReportFailure"
WATCH_RPC = "/secure_runner.v1.Orchestrator/WatchModels"
# Delays before reopening the model-list stream and before resending a failure report (the last repeats).
RESYNC_BACKOFF_SECONDS = (0.25, 0.5, 1.0, 2.0, 5.0)
REPORT_TIMEOUT_SECONDS = 5.0
CLOSE_GRACE_SECONDS = 5.0
READY_POLL_SECONDS = 0.01
IDENTITY_THREADS = 32  # identity checks block a thread each (TLS handshake), up to their own timeout
RETIRED_PER_MODEL = 16  # deployments remembered per model id, to recognize stale news about them
# Listed but down (not gone): every call targeting these gets a MODEL_STARTING / MODEL_RECOVERING result.
DOWN_STATES = {orchestrator_pb2.MODEL_STATE_STARTING: "STARTING", orchestrator_pb2.MODEL_STATE_RECOVERING: "RECOVERING"}
# Room left in a request for the model id field and protobuf framing.
MAX_SHARED_REQUEST_BYTES = tls.MAX_MESSAGE_BYTES - 1024

Arguments = Sequence[values_pb2.Argument] | Callable[[ModelIdentity], Sequence[values_pb2.Argument]] | None
KwArguments = Sequence[values_pb2.KwArgument] | Callable[[ModelIdentity], Sequence[values_pb2.KwArgument]] | None


def _importable_base_methods(base_classname: str) -> frozenset[str] | None:
    """The methods `base_classname` declares, if this (the coordinator's) process can import it."""
    module_name, _, class_name = base_classname.rpartition(".")
    try:
        base = getattr(importlib.import_module(module_name), class_name)
    except Exception:  # noqa: BLE001 - not importable here: runners' reports, narrowed, stand in
        return None
    return allowlist.declared_methods(base) if inspect.isclass(base) else None


def encode_call(method: str, arguments, kwargs) -> bytes:
    """The shared bytes of a call request, checked as a runner will check them: the coordinator's errors raise here."""
    try:
        request = runner_pb2.CallRequest(method=method, arguments=arguments or (), kwargs=kwargs or ())
    except (TypeError, ValueError) as exc:
        raise RequestError(
            ErrorCode.INVALID_ARGUMENTS, f"arguments must be Argument and KwArgument messages: {exc}"
        ) from None
    try:
        codec.check_arguments(request.arguments, request.kwargs)  # values encode_data made are not decoded again
    except CodecError as exc:
        raise RequestError(exc.code, exc.message) from None
    shared = request.SerializeToString()
    if len(shared) > MAX_SHARED_REQUEST_BYTES:
        raise RequestError(
            ErrorCode.MESSAGE_TOO_LARGE, f"request of {len(shared)} bytes is over the {tls.MAX_MESSAGE_BYTES} byte cap"
        )
    return shared


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
        metrics: ClientMetrics | None = None,
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
        self._registry = open_registry_source(security.registry, security.chain_config)
        self._address = f"{host}:{port}"
        self._models: dict[str, RemoteModel] = {}  # connected (or connecting) models, by id
        self._listed: dict[str, ModelIdentity] = {}  # the last identity the orchestrator gave each model id
        self._retired: dict[str, deque[str]] = {}  # deployments replaced or stopped: news of them is stale
        self._disconnected: dict[str, str] = {}  # model id -> why the limits dropped its last deployment
        self._down: dict[str, orchestrator_pb2.ModelInfo] = {}  # listed STARTING or RECOVERING: in every result
        # The base class's methods: from the class itself when this process can import it, else what
        # runners report, narrowed by each report and never widened (allowlist.narrowed).
        self._declared: frozenset[str] | None = _importable_base_methods(base_classname)
        self._declared_locally = self._declared is not None
        self._reports: dict[tuple[str, str], asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()
        self._identity_executor = ThreadPoolExecutor(IDENTITY_THREADS, thread_name_prefix="sr-identity")
        self._nodes = NodeChannels(self.crunch_id, security)
        self._channel: grpc.aio.Channel | None = None
        self._channel_cert_sha256 = ""  # of the certificate the orchestrator channel presents
        self._orchestrator_name = PeerIdentity.make(self.crunch_id, Role.ORCHESTRATOR, ORCHESTRATOR_ID).tls_server_name
        self._stream = None
        self._updates = 0
        self._metrics = metrics  # opt-in (client/metrics.py); None: no metrics work at all
        if metrics is not None:
            metrics.track(self)

    # -- model list -------------------------------------------------------------------

    def _orchestrator_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            credentials, self._channel_cert_sha256 = tls.client_credentials(self._security.tls)
            self._channel = grpc.aio.secure_channel(
                self._address, credentials, options=channel_options(self._orchestrator_name)
            )
        return self._channel

    async def _orchestrator_destination(self) -> str:
        """SHA-256 of the TLS key the orchestrator presents (its tokens' `dst`), from a handshake of our own."""
        host, _, port = self._address.rpartition(":")
        try:
            der = await asyncio.get_running_loop().run_in_executor(
                self._identity_executor, tls.fetch_server_certificate,
                host, int(port), self._security.tls, self._orchestrator_name, IDENTITY_TIMEOUT_SECONDS,
            )
        except ValueError:
            raise RequestError(ErrorCode.UNREACHABLE, f"bad orchestrator address {self._address!r}") from None
        return tls.spki_sha256(der)

    def _orchestrator_token(self, rpc: str, audience: str, shared: bytes, destination: str) -> bytes:
        self._orchestrator_channel()  # the token binds the certificate of the channel that carries it
        return self._signer.sign(
            audience=[audience], destinations=[destination], cert_sha256=self._channel_cert_sha256,
            rpc=rpc, method="", shared_body=shared,
        )

    async def _open_stream(self):
        """Open the model-list stream: like every coordinator call, signed (SMP-1..14) for this orchestrator."""
        token = self._orchestrator_token(WATCH_RPC, self.crunch_id, b"", await self._orchestrator_destination())
        watch = self._orchestrator_channel().unary_stream(
            WATCH_RPC, response_deserializer=orchestrator_pb2.ModelList.FromString
        )
        # WatchModelsRequest(crunch_id) is exactly its field 1: the signed form with nothing after it.
        return watch(model_id_field(self.crunch_id), metadata=((TOKEN_KEY, token),), wait_for_ready=True)

    async def init(self) -> None:
        """Fetch the model list and connect to every model, returning within `connect_timeout`.

        Raises RequestError(UNREACHABLE) if the orchestrator sends no model list in
        time. Returns once every model has had its first connection attempt, or at
        the deadline; models not ready by then keep connecting in the background
        and join when they come up.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        try:
            snapshot = await asyncio.wait_for(self._first_snapshot(deadline), self._connect_timeout)
        except (TimeoutError, grpc.aio.AioRpcError, RequestError, AuthError, ConfigError) as exc:
            if self._stream is not None:
                self._stream.cancel()
            self._stream = None
            why = (
                "timed out" if isinstance(exc, TimeoutError)
                else exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            )
            raise RequestError(
                ErrorCode.UNREACHABLE, f"no model list from the orchestrator at {self._address} ({why})"
            ) from None
        if snapshot is grpc.aio.EOF:
            self._stream = None
            raise RequestError(ErrorCode.UNREACHABLE, "orchestrator closed the model list stream")
        self._apply(snapshot)
        while loop.time() < deadline and any(m.attempts == 0 for m in self._models.values()):
            await asyncio.sleep(READY_POLL_SECONDS)

    async def _first_snapshot(self, deadline: float) -> orchestrator_pb2.ModelList:
        """Open the model-list stream and read its first snapshot, retrying until `deadline` while
        the orchestrator cannot be reached yet or started less than BACKDATE_SECONDS ago."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._stream = await self._open_stream()
                return await self._stream.read()
            except (RequestError, grpc.aio.AioRpcError) as exc:
                just_started = isinstance(exc, grpc.aio.AioRpcError) and (
                    reason_of(exc) == ErrorCode.TOKEN_ISSUED_BEFORE_START
                )
                if not (just_started or isinstance(exc, RequestError)) or loop.time() >= deadline:
                    raise
                await asyncio.sleep(BACKDATE_SECONDS if just_started else READY_POLL_SECONDS * 10)

    async def ready(self, timeout: float, models: Iterable[str] | None = None) -> bool:
        """Wait at most `timeout` s until no targeted model is connecting, reconnecting or cooling down.

        True when every targeted model is settled (ready, or failed its setup for good).
        Calls never need this (they skip models that are not ready); it is for a
        coordinator that would rather wait a little than get a skipped result.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        wanted = None if models is None else set(_ids(models))
        while True:
            settled = all(
                m.state.settled for m in self._models.values() if wanted is None or m.model_id in wanted
            )
            if settled or loop.time() >= deadline:
                return settled
            await asyncio.sleep(READY_POLL_SECONDS)

    async def sync(self) -> None:
        """Apply every model-list update, reconnecting to the orchestrator with backoff. Runs forever."""
        failures = 0
        while True:
            try:
                if self._stream is None:
                    self._stream = await self._open_stream()
                # read(), not `async for`: init() already read from this stream, and
                # grpc.aio forbids mixing the two styles on one call.
                while (snapshot := await self._stream.read()) is not grpc.aio.EOF:
                    failures = 0
                    self._apply(snapshot)
                lost = "stream ended"
            except grpc.aio.AioRpcError as exc:
                lost = reason_of(exc) or exc.code().name
            except (RequestError, AuthError, ConfigError) as exc:  # the orchestrator's identity check
                lost = str(exc)
            delay = backoff_delay(RESYNC_BACKOFF_SECONDS, failures)
            failures += 1
            log.warning("model list stream lost (%s); keeping %d known models, retrying in %.2f s",
                        lost, len(self._models), delay)
            if self._stream is not None:
                self._stream.cancel()
            self._stream = None
            await asyncio.sleep(delay)

    def _is_stale(self, info: orchestrator_pb2.ModelInfo) -> bool:
        return info.deployment_id in self._retired.get(info.model_id, ())

    def _retire(self, model_id: str, deployment_id: str) -> None:
        self._retired.setdefault(model_id, deque(maxlen=RETIRED_PER_MODEL)).append(deployment_id)

    def _apply(self, snapshot: orchestrator_pb2.ModelList) -> None:
        """Make the connected models match a snapshot; never waits (connecting runs in the background)."""
        self._updates += 1
        current: dict[str, orchestrator_pb2.ModelInfo] = {}
        stale: set[str] = set()
        for info in snapshot.models:
            if self._is_stale(info):
                stale.add(info.model_id)
                log.info("ignoring stale news of model %s deployment %s", info.model_id, info.deployment_id)
            else:
                current[info.model_id] = info
        for model_id, model in list(self._models.items()):
            info = current.get(model_id)
            if info is None and model_id in stale:
                continue  # only news of an older deployment: ours stands
            if (
                info is not None
                and info.deployment_id == model.identity.deployment_id
                and info.address == model.address
                and info.state == orchestrator_pb2.MODEL_STATE_RUNNING
            ):
                continue
            # Gone, stopped or replaced: that deployment is over. Starting or recovering: it may come back.
            over = info is None or info.deployment_id != model.identity.deployment_id
            self._forget(model_id, retire=over or info.state == orchestrator_pb2.MODEL_STATE_STOPPED)
        registry = self._registry.current().registry
        for model_id in set(self._down) - stale:  # down is not gone: kept until news of that model says otherwise
            if current.get(model_id) is None or current[model_id].state not in DOWN_STATES:
                del self._down[model_id]
        for model_id, info in current.items():
            identity = _identity(info, registry.model(self.crunch_id, info.model_id))
            if identity is None:
                continue
            self._listed[model_id] = identity
            if info.state in DOWN_STATES:
                self._down[model_id] = info
            if info.state == orchestrator_pb2.MODEL_STATE_RUNNING and model_id not in self._models:
                self._connect(identity, info)

    def _connect(self, identity: ModelIdentity, info: orchestrator_pb2.ModelInfo) -> None:
        model = RemoteModel(
            identity,
            self._nodes.acquire(info.address, info.node_id or identity.model_id),
            info.runner_delegation,
            self.crunch_id,
            self._security,
            self._signer,
            self._registry.current,
            self._identity_executor,
        )
        self._models[identity.model_id] = model
        self._disconnected.pop(identity.model_id, None)
        model.connect(self.base_classname, self._instance_args, self._instance_kwargs, self._setup_timeout)

    def _forget(self, model_id: str, *, retire: bool) -> RemoteModel:
        model = self._models.pop(model_id)
        if retire:
            self._retire(model_id, model.identity.deployment_id)
        model.close()
        if (closing := self._nodes.release(model.node)) is not None:
            self._background(closing)
        return model

    @property
    def models(self) -> list[ModelIdentity]:
        """The models a call would target right now."""
        return [m.identity for m in self._models.values()]

    @property
    def model_list_updates(self) -> int:
        """How many model-list snapshots have been applied (from any orchestrator connection)."""
        return self._updates

    @property
    def states(self) -> dict[str, ModelState]:
        """Each targeted model's connection state (READY, CONNECTING, COOLING_DOWN, ...)."""
        return {model_id: model.state for model_id, model in self._models.items()}

    @property
    def ready_model_count(self) -> int:
        """How many models a call would reach now; safe to read from another thread (a metrics scrape)."""
        return sum(model.state is ModelState.READY for model in list(self._models.values()))

    # -- calls ------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        arguments: Arguments = None,
        kwargs: KwArguments = None,
        models: Iterable[str] | None = None,
    ) -> dict[ModelIdentity, CallResult]:
        """Call `method` on every model, or on the ids in `models`; exactly one result per targeted model.

        `arguments` and `kwargs` are the call's Argument / KwArgument messages, or a
        callable that returns them for a given ModelIdentity (per-model arguments).
        An id in `models` that is not running gets a MODEL_UNAVAILABLE result; a model
        the orchestrator lists as STARTING or RECOVERING gets MODEL_STARTING or
        MODEL_RECOVERING in every call that targets it (all calls without `models`); an
        empty `models` targets nothing. Raises RequestError at once, sending nothing
        and blaming no model, for a method the base class does not declare or
        arguments that cannot be encoded.
        """
        started = time.perf_counter()
        targets, unavailable = self._targets(models)
        self._check_method(method)
        requests = self._requests(method, arguments, kwargs, targets)
        results: dict[RemoteModel, CallResult] = {}
        for model in targets:
            if (skipped := model.skipped()) is not None:
                model.record(skipped, sent=False)
                results[model] = skipped
        ready = [model for model in targets if model not in results]
        flights = self._send(method, ready, requests)
        outcomes = await asyncio.gather(*(flight.outcome() for flight in flights))
        for model, flight, outcome in zip(ready, flights, outcomes, strict=True):
            results[model] = model.result_of(flight, outcome)  # outputs decoded only now
            model.record(results[model], sent=True)
        for model in targets:
            self._enforce_limits(model)
        answer = {results[model].model: results[model] for model in targets}
        answer.update((result.model, result) for result in unavailable)
        if self._metrics is not None:
            self._metrics.record_round(method, answer.values(), time.perf_counter() - started)
        return answer

    def _targets(self, models: Iterable[str] | None) -> tuple[list[RemoteModel], list[CallResult]]:
        """The connected models targeted, and a result now for each targeted one that is not connected.

        Every call targets the models the orchestrator lists as STARTING or RECOVERING: each
        gets an infrastructure FAILURE saying which, since when and why (down is not gone).
        """
        if models is None:
            return list(self._models.values()), [self._unavailable(m) for m in self._down if m not in self._models]
        wanted = list(dict.fromkeys(_ids(models)))
        targets = [self._models[model_id] for model_id in wanted if model_id in self._models]
        return targets, [self._unavailable(model_id) for model_id in wanted if model_id not in self._models]

    @property
    def down(self) -> dict[str, str]:
        """Models the orchestrator lists as STARTING or RECOVERING and not connected: id -> state."""
        return {m: DOWN_STATES[info.state] for m, info in self._down.items() if m not in self._models}

    def _unavailable(self, model_id: str) -> CallResult:
        if (info := self._down.get(model_id)) is not None and model_id not in self._disconnected:
            since = datetime.fromtimestamp(info.state_since_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            why = f"{DOWN_STATES[info.state]} since {since}" + (f": {info.state_reason}" if info.state_reason else "")
            reason = ErrorCode.MODEL_STARTING if info.state == orchestrator_pb2.MODEL_STATE_STARTING else ErrorCode.MODEL_RECOVERING
            return CallResult(self._listed[model_id], CallStatus.FAILURE, reason=reason, message=why[:300])
        identity = self._listed.get(model_id) or ModelIdentity(model_id, "", "", "", "")
        why = self._disconnected.get(model_id) or (
            "not running now" if model_id in self._listed else "not in the orchestrator's model list"
        )
        return CallResult(identity, CallStatus.FAILURE, reason=ErrorCode.MODEL_UNAVAILABLE, message=why)

    def _check_method(self, method: str) -> None:
        if not isinstance(method, str) or not method:
            raise RequestError(ErrorCode.METHOD_NOT_ALLOWED, f"method must be a non-empty name, got {method!r}")
        if not self._declared_locally:
            for model in self._models.values():  # a report holding every declared name cannot narrow them
                if model.methods and (self._declared is None or not self._declared <= model.methods):
                    self._declared = allowlist.narrowed(self._declared, model.methods)
        if not allowlist.is_callable_name(method) or self._declared is not None and method not in self._declared:
            raise RequestError(ErrorCode.METHOD_NOT_ALLOWED, f"{method!r} is not a method of {self.base_classname}")

    def _requests(
        self, method: str, arguments: Arguments, kwargs: KwArguments, targets: list[RemoteModel]
    ) -> dict[RemoteModel, bytes]:
        """Each target's shared request bytes: encoded once, or once per model for per-model arguments."""
        if not callable(arguments) and not callable(kwargs):
            return dict.fromkeys(targets, encode_call(method, arguments, kwargs))
        requests = {}
        for model in targets:
            try:
                args = arguments(model.identity) if callable(arguments) else arguments
                kw = kwargs(model.identity) if callable(kwargs) else kwargs
            except Exception as exc:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENTS, f"the arguments callable failed for model {model.model_id}: {exc!r}"
                ) from exc
            try:
                requests[model] = encode_call(method, args, kw)
            except RequestError as exc:
                raise RequestError(exc.code, f"arguments for model {model.model_id}: {exc.message}") from None
        return requests

    def _send(self, method: str, ready: list[RemoteModel], requests: dict[RemoteModel, bytes]) -> list:
        """Hand every call to gRPC: one FanOut per node hosting several targets, one Call otherwise.

        Every request is encoded and signed before the first is sent, so no call's
        latency includes preparing another. Returns one flight per model of `ready`.
        """
        nodes: dict[tuple[str, str], list[RemoteModel]] = {}
        for model in ready:
            nodes.setdefault((model.address, model.node_id), []).append(model)
        singles = [group[0] for group in nodes.values() if len(group) == 1]
        tokens = self._sign(method, singles, requests)
        prepared = []
        parsed: dict[bytes, runner_pb2.CallRequest] = {}  # each distinct request parsed once for all nodes
        for (_, node_id), group in nodes.items():
            if len(group) == 1:
                prepared.append((group, None))
                continue
            for start in range(0, len(group), MAX_AUDIENCE):
                chunk = group[start : start + MAX_AUDIENCE]
                request = fan_out_request([(m.model_id, requests[m]) for m in chunk], method, parsed)
                shared = request.SerializeToString()
                node = chunk[0].node
                token = self._signer.sign(
                    audience=[m.model_id for m in chunk], destinations=[node.destination],
                    cert_sha256=node.cert_sha256, rpc=FANOUT_RPC, method=method, shared_body=shared,
                )
                prepared.append((chunk, (model_id_field(node_id) + shared, token)))
        flights = {}
        for chunk, fan_out in prepared:
            if fan_out is None:
                model = chunk[0]
                flights[model] = model.send(requests[model], tokens[model], self.timeout)
                continue
            node_flight = chunk[0].send_fan_out(*fan_out, self.timeout, [m.model_id for m in chunk])
            flights.update((m, node_flight.flights[m.model_id]) for m in chunk)
        return [flights[model] for model in ready]

    def _sign(self, method: str, models: list[RemoteModel], requests: dict[RemoteModel, bytes]) -> dict:
        """One token per distinct request body, channel certificate and MAX_DESTINATIONS models, not one per model.

        Each token names the runners of its models (`dst`), so none of them can be
        replayed to another runner hosting one of those model ids.
        """
        groups: dict[tuple[bytes, str], list[RemoteModel]] = {}
        for model in models:
            groups.setdefault((requests[model], model.node.cert_sha256), []).append(model)
        tokens: dict[RemoteModel, bytes] = {}
        per_token = min(MAX_AUDIENCE, MAX_DESTINATIONS)
        for (shared, cert_sha256), group in groups.items():
            for start in range(0, len(group), per_token):
                chunk = group[start : start + per_token]
                token = self._signer.sign(
                    audience=[m.model_id for m in chunk], destinations=[m.node.destination for m in chunk],
                    cert_sha256=cert_sha256, rpc=CALL_RPC, method=method, shared_body=shared,
                )
                tokens.update(dict.fromkeys(chunk, token))
        return tokens

    def _enforce_limits(self, model: RemoteModel) -> None:
        if self._models.get(model.model_id) is not model:
            return  # already replaced or forgotten by a model-list update during the call
        if model.consecutive_timeouts >= self.max_consecutive_timeouts:
            why = f"{model.consecutive_timeouts} consecutive timeouts"
        elif model.consecutive_failures >= self.max_consecutive_failures:
            why = f"{model.consecutive_failures} consecutive failures"
        else:
            return
        log.warning("disconnecting model %s (%s): %s", model.model_id, model.identity.deployment_id, why)
        self._forget(model.model_id, retire=True)
        self._disconnected[model.model_id] = f"disconnected after {why}"
        if self._metrics is not None:
            self._metrics.record_disconnection(model.last_fault.reason if model.last_fault else "")
        self._report_failure(model)

    def _background(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    def _report_failure(self, model: RemoteModel) -> None:
        key = (model.model_id, model.identity.deployment_id)
        if key not in self._reports:
            self._reports[key] = self._background(self._deliver_report(model))
            self._reports[key].add_done_callback(lambda _task: self._reports.pop(key, None))

    @property
    def pending_reports(self) -> list[tuple[str, str]]:
        """(model id, deployment id) of failure reports not delivered yet."""
        return list(self._reports)

    async def _deliver_report(self, model: RemoteModel) -> None:
        """Tell the orchestrator to stop the model; retried with backoff until it answers."""
        timeouts = model.consecutive_timeouts >= self.max_consecutive_timeouts
        last = model.last_fault
        shared = orchestrator_pb2.FailureReport(
            deployment_id=model.identity.deployment_id,
            reason="MAX_CONSECUTIVE_TIMEOUTS" if timeouts else "MAX_CONSECUTIVE_FAILURES",
            message=f"{last.reason}: {last.message}"[:1000] if last else "",
            consecutive_failures=model.consecutive_failures,
            consecutive_timeouts=model.consecutive_timeouts,
        ).SerializeToString()
        report = self._orchestrator_channel().unary_unary(
            REPORT_RPC, response_deserializer=orchestrator_pb2.FailureReportAck.FromString
        )
        attempt = 0
        while True:
            try:
                destination = await self._orchestrator_destination()
                token = self._orchestrator_token(REPORT_RPC, model.model_id, shared, destination)
                ack = await report(
                    model_id_field(model.model_id) + shared,
                    metadata=((TOKEN_KEY, token),),
                    timeout=REPORT_TIMEOUT_SECONDS,
                    wait_for_ready=True,
                )
            except (grpc.aio.AioRpcError, RequestError, AuthError, ConfigError) as exc:
                delay = backoff_delay(RESYNC_BACKOFF_SECONDS, attempt)
                attempt += 1
                why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else exc.code
                log.warning("failure report for %s not delivered (%s); retrying in %.2f s",
                            model.model_id, why, delay)
                await asyncio.sleep(delay)
                continue
            log.info("failure report for %s delivered; stopped=%s", model.model_id, ack.stopped)
            return

    async def close(self) -> None:
        for model_id in list(self._models):
            self._forget(model_id, retire=False)
        if self._closing:  # channel closes and failure reports still being delivered
            _, pending = await asyncio.wait(set(self._closing), timeout=CLOSE_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            if self._reports:
                log.error("closing with undelivered failure reports: %s", sorted(self._reports))
        if self._stream is not None:
            self._stream.cancel()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
        self._identity_executor.shutdown(wait=False, cancel_futures=True)
        self._registry.close()


def _ids(models: Iterable[str]) -> Iterable[str]:
    if isinstance(models, str | bytes):
        raise RequestError(ErrorCode.INVALID_ARGUMENTS, "models= takes a collection of model ids, not one id")
    return models


def _identity(info: orchestrator_pb2.ModelInfo, registered: ModelEntry | None) -> ModelIdentity | None:
    """Who a listed model is: its names from the coordinator's registry, never from the orchestrator's feed.

    The feed says only where a model runs and which deployment it is; a model the
    registry does not know gets empty names (and fails its identity check, SMP-31).
    """
    try:
        model_id = validate_id(info.model_id, "model id")
    except ConfigError as exc:
        log.warning("ignoring model with invalid id: %s", exc)
        return None
    if registered is None:
        return ModelIdentity(model_id, "", "", "", info.deployment_id)
    if (info.model_name, info.cruncher_id, info.cruncher_name) != (
        registered.model_name, registered.cruncher_id, registered.cruncher_name
    ):
        log.warning("the orchestrator's names for model %s differ from the registry's; using the registry's", model_id)
    return ModelIdentity(
        model_id, registered.model_name, registered.cruncher_id, registered.cruncher_name, info.deployment_id
    )
