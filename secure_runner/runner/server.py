"""The Model Runner server: one servicer, the auth interceptor, health, workers.

Health reports one service per hosted model (named by its model id) plus the
overall service "": a model is SERVING only while its worker is up and set up
(or ready for Setup), so a coordinator can see a restart in progress. The
service "secure_runner.registry" is NOT_SERVING while the registry (the file, or
the chain adapter given `chain_config`) cannot be reloaded (each failed version is also an audit line); past the time policy's
`max_registry_age_seconds` calls are refused (REGISTRY_STALE).

The orchestrator may stop or redeploy one hosted model without disturbing the
others, and read each model's status (`retire`, `redeploy`, `model_status`; see
runner/control.py, its control socket).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel, ConfigDict

from secure_runner.errors import ConfigError, ErrorCode, RequestError, SecureRunnerError
from secure_runner.log_format import log_fields
from secure_runner.metrics import MetricsEndpoint, MetricsServer, RunnerMetrics, serve_metrics
from secure_runner.runner.supervisor import ModelHost, ModelStatus, WorkerCall, WorkerGone, failure_response
from secure_runner.runner.sandbox.policy import SandboxPolicy
from secure_runner.runner.template import WorkerTemplate
from secure_runner.runner.worker import WorkerLimits
from secure_runner.smp.identity import PeerIdentity, Role, validate_id
from secure_runner.smp.replay import ReplayCache
from secure_runner.smp.rules import TimePolicy
from secure_runner.transport import tls
from secure_runner.transport.audit_log import AuditLog
from secure_runner.transport.decisions import DecisionRecorder
from secure_runner.transport.gate import PeerGate
from secure_runner.transport.registry_file import (
    REGISTRY_HEALTH_SERVICE,
    audit_registry_failure,
    open_registry_source,
    watch_registry,
)
from secure_runner.transport.token_auth import ServedKeys, TokenAuthInterceptor
from secure_runner.transport.status import abort
from secure_runner.v1 import runner_pb2, runner_pb2_grpc

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROTECTED_RPCS = tuple(
    f"/secure_runner.v1.ModelRunner/{name}" for name in runner_pb2.DESCRIPTOR.services_by_name["ModelRunner"].methods_by_name
)
# Answer TIMEOUT this long before the caller's own deadline, so the answer arrives.
DEADLINE_MARGIN_SECONDS = 0.05
# A FanOutResults message stays this far under the gRPC cap; each result adds its tag and length.
MAX_FAN_OUT_MESSAGE_BYTES = tls.MAX_MESSAGE_BYTES - 64 * 1024
FAN_OUT_RESULT_OVERHEAD = 16


class RunnerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    crunch_id: str
    node_id: str
    models: dict[str, Path]
    tls: tls.TlsFiles
    registry: Path | None = None  # the registry file, unless `chain_config` selects the chain adapter
    chain_config: Path | None = None  # a registry.chain.ChainRegistryConfig JSON file
    audit_log: Path
    replay_cache_size: int = 200_000
    time_policy: TimePolicy = TimePolicy()
    handshake_timeout_ms: int = 5_000
    base_paths: list[Path] = []
    host: str = "127.0.0.1"
    port: int = 0
    max_call_seconds: float = 300.0
    setup_timeout: float = 60.0
    limits: WorkerLimits = WorkerLimits()
    sandbox: SandboxPolicy = SandboxPolicy()
    metrics: MetricsEndpoint | None = None  # None: no metrics endpoint, and nothing counted for one
    worker_template: bool = True  # fork workers from a pre-imported template (runner/template.py)


class ModelRunnerServicer(runner_pb2_grpc.ModelRunnerServicer):
    """Serves authenticated requests; refusals it makes itself are audited like the interceptor's.

    Every model call's outcome, and every call refused here, is counted in `metrics` (None: metrics off).
    """

    def __init__(self, hosts: dict[str, ModelHost], settings: RunnerSettings, decisions: DecisionRecorder,
                 metrics: RunnerMetrics | None) -> None:
        self._hosts = hosts
        self._settings = settings
        self._decisions = decisions
        self._metrics = metrics
        self._peers = tls.PeerCertificates()

    def _audit_refusal(self, context, error: SecureRunnerError, rpc: str, model_id: str, method: str) -> None:
        if self._metrics is not None:
            self._metrics.count_refusal(model_id, method, error.code)
        self._decisions.deny(
            error.code,
            tls.peer_name(self._peers.from_auth_context(context.auth_context())),
            {"rpc": rpc, "model": model_id[:64], "method": method[:64]},
        )

    async def _refuse(self, context, error: SecureRunnerError, rpc: str, request) -> None:
        self._audit_refusal(context, error, rpc, request.model_id, getattr(request, "method", ""))
        await abort(context, error)

    def _call_timeout(self, context) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self._settings.max_call_seconds
        return min(self._settings.max_call_seconds, remaining - DEADLINE_MARGIN_SECONDS)

    async def _host(self, model_id: str, context, rpc: str, request) -> ModelHost:
        try:
            return host_of(self._hosts, model_id)
        except RequestError as error:
            await self._refuse(context, error, rpc, request)

    async def Setup(self, request, context):
        host = await self._host(request.model_id, context, "Setup", request)
        return await host.setup(request)

    async def Call(self, request, context):
        host = await self._host(request.model_id, context, "Call", request)
        try:
            call = WorkerCall.encode(request.method, request.arguments, request.kwargs)
            try:
                response = await self._counted_call(request.model_id, host, call, self._call_timeout(context))
            finally:
                call.close()  # its shared payload, if any: the worker has answered
        except SecureRunnerError as exc:
            await self._refuse(context, exc, "Call", request)
        log.debug("model %s %s -> %s", request.model_id, request.method, response.status)
        return response

    async def FanOut(self, request, context):
        """Call every requested model concurrently; yield each result as soon as it is ready.

        Results that finish while the previous batch is being sent go out together in
        the next one. A model this runner does not host, or a method its base class
        does not declare, is a FAILURE result for that model (audited), never the end
        of the stream; so is a bug in serving one model (INTERNAL).
        """
        if request.node_id != self._settings.node_id:
            error = RequestError(ErrorCode.MODEL_UNKNOWN, f"this runner is node {self._settings.node_id!r}")
            self._audit_refusal(context, error, "FanOut", request.node_id, request.method)
            await abort(context, error)
        timeout = self._call_timeout(context)
        common = await self._fan_out_call(context, request, request)  # once for all models
        per_model = {m.model_id: m for m in request.per_model}
        finished: list[runner_pb2.FanOutResult] = []
        news = asyncio.Event()

        def collect(model_id: str, task: asyncio.Task) -> None:
            if task.cancelled():  # only once the stream has ended: nobody would read it
                return
            finished.append(runner_pb2.FanOutResult(model_id=model_id, response=_outcome(model_id, task)))
            news.set()

        tasks, calls = [], [common]  # the calls' shared payloads are closed once every model has answered
        try:
            for model_id in dict.fromkeys(request.model_ids):
                own = per_model.get(model_id)
                call = common if own is None else await self._fan_out_call(context, request, own)
                calls.append(call)
                task = asyncio.ensure_future(self._fan_out_one(model_id, call, timeout, context))
                task.add_done_callback(functools.partial(collect, model_id))
                tasks.append(task)
            remaining = len(tasks)
            while remaining:
                await news.wait()
                news.clear()
                batch, finished[:] = finished[:], []
                remaining -= len(batch)
                for part in _within_message_cap(batch):
                    yield runner_pb2.FanOutResults(results=part)
        finally:
            for task in tasks:  # the caller went away: its models' calls are cancelled too
                task.cancel()
            for call in calls:  # a cancelled call never sends its descriptor afterwards
                call.close()

    async def _fan_out_call(self, context, request, values) -> WorkerCall:
        """The WorkerCall of `values` (the request, or one model's own arguments); the stream ends, typed, if it cannot be made."""
        try:
            return WorkerCall.encode(request.method, values.arguments, values.kwargs)
        except SecureRunnerError as exc:  # no memfd for its shared payload (descriptors or memory exhausted)
            self._audit_refusal(context, exc, "FanOut", request.node_id, request.method)
            await abort(context, exc)

    async def _fan_out_one(self, model_id: str, call: WorkerCall, timeout: float, context) -> runner_pb2.CallResponse:
        try:
            return await self._counted_call(model_id, host_of(self._hosts, model_id), call, timeout)
        except SecureRunnerError as exc:
            self._audit_refusal(context, exc, "FanOut", model_id, call.method)
            return failure_response(exc.code, exc.message)

    async def _counted_call(self, model_id: str, host: ModelHost, call: WorkerCall, timeout: float):
        """`host.call`, counted once answered: in the host's own counters (runner/call_stats.py, the status
        view) and, when metrics are on, in secure_runner_runner_calls_total."""
        started = time.perf_counter_ns()
        response = await host.call(call, timeout)
        host.stats.record(response, (time.perf_counter_ns() - started) // 1000)
        if self._metrics is not None:
            self._metrics.count_call(model_id, call.method, response)
        return response

    async def Reset(self, request, context):
        host = await self._host(request.model_id, context, "Reset", request)
        await host.reset()
        return runner_pb2.ResetResponse(status=runner_pb2.CALL_STATUS_SUCCESS)


def _within_message_cap(results: list[runner_pb2.FanOutResult]):
    """`results` split into messages under the gRPC cap, so no answer fails its node-mates' stream.

    One result always fits: the supervisor refuses a worker's answer over MAX_CALL_ANSWER_BYTES.
    """
    part, size = [], 0
    for result in results:
        grows = result.ByteSize() + FAN_OUT_RESULT_OVERHEAD
        if part and size + grows > MAX_FAN_OUT_MESSAGE_BYTES:
            yield part
            part, size = [], 0
        part.append(result)
        size += grows
    if part:
        yield part


def _outcome(model_id: str, task: asyncio.Task) -> runner_pb2.CallResponse:
    """A finished fan-out task's response; a task that hit a bug still answers (INTERNAL)."""
    if task.exception() is None:
        return task.result()
    log.error("fan-out call of model %s ended without a response: %r", model_id, task.exception())
    return failure_response(ErrorCode.INTERNAL, "the runner could not serve this call")


def host_of(hosts: dict[str, ModelHost], model_id: str) -> ModelHost:
    """The host of `model_id`; RequestError(MODEL_UNKNOWN) if this runner does not host it."""
    host = hosts.get(model_id)
    if host is None:
        raise RequestError(ErrorCode.MODEL_UNKNOWN, f"this runner does not host {model_id[:64]!r}")
    return host


class RunnerServer:
    def __init__(self, settings: RunnerSettings) -> None:
        validate_id(settings.crunch_id, "crunch id")
        validate_id(settings.node_id, "node id")
        for model_id in settings.models:
            validate_id(model_id, "model id")
        self.settings = settings
        self.health = health.aio.HealthServicer()
        # Workers are forked from a secret-free template process (runner/template.py) unless turned off.
        self.template = WorkerTemplate() if settings.worker_template else None
        self.hosts: dict[str, ModelHost] = {}
        # Metrics off: nothing is counted at all (the hot path pays one `is None` test).
        self.metrics = RunnerMetrics(self.hosts) if settings.metrics is not None else None
        self.hosts.update((model_id, self._new_host(model_id)) for model_id in settings.models)
        self.audit = AuditLog(settings.audit_log)
        self.decisions = DecisionRecorder(self.audit, self.metrics)
        self._registry = open_registry_source(
            settings.registry, settings.chain_config,
            on_failure=functools.partial(audit_registry_failure, self.decisions))
        self._registry_watch: asyncio.Task | None = None
        replay = ReplayCache(settings.replay_cache_size)
        auth = TokenAuthInterceptor(
            settings.crunch_id,
            PROTECTED_RPCS,
            self._registry.current,
            self.decisions,
            replay=replay,
            destinations=ServedKeys(settings.tls.cert),
            policy=settings.time_policy,
        )
        if self.metrics is not None:
            self.metrics.watch(replay=replay, registry_fetched_at=lambda: self._registry.fetched_at, tls=settings.tls)
        self.metrics_server: MetricsServer | None = None
        tls.raise_open_file_limit()
        self._server = grpc.aio.server(
            interceptors=[PeerGate(settings.crunch_id, self.decisions), auth],
            options=tls.server_options(handshake_timeout_ms=settings.handshake_timeout_ms),
        )
        runner_pb2_grpc.add_ModelRunnerServicer_to_server(
            ModelRunnerServicer(self.hosts, settings, self.decisions, self.metrics), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._health_tasks: set[asyncio.Task] = set()
        self.port = 0

    def _new_host(self, model_id: str) -> ModelHost:
        settings = self.settings
        return ModelHost(
            model_id,
            settings.models[model_id].resolve(),
            [p.resolve() for p in settings.base_paths],
            settings.limits,
            settings.setup_timeout,
            self._on_health,
            sandbox=settings.sandbox,
            template=self.template,
            on_failure=self.metrics.count_restart if self.metrics is not None else ModelHost.on_failure,
        )

    async def retire(self, model_id: str) -> None:
        """Stop hosting `model_id` (a control command).

        Calls for it are refused from now on (MODEL_UNKNOWN); once this returns its
        worker is killed, its cgroup removed and its health NOT_SERVING.
        """
        host = self.hosts.pop(model_id)
        await host.close()  # final: a call that found the host before it left starts no worker
        await self.health.set(model_id, NOT_SERVING)

    async def redeploy(self, model_id: str) -> None:
        """Host `model_id` anew (a control command): a fresh worker that never saw its Setup.

        The model is not hosted meanwhile (MODEL_UNKNOWN): no call made to the old
        worker reaches the new one, which serves only after a new Setup. If the new
        worker cannot start, the model stays unhosted and the error is raised.
        """
        await self.retire(model_id)
        fresh = self._new_host(model_id)
        await fresh.start()
        self.hosts[model_id] = fresh

    def _on_health(self, model_id: str, serving: bool) -> None:
        task = asyncio.get_running_loop().create_task(self.health.set(model_id, SERVING if serving else NOT_SERVING))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    def model_status(self) -> dict[str, ModelStatus]:
        """Each hosted model's state, last failure (code, message) and since when: for operators."""
        return {model_id: host.status for model_id, host in self.hosts.items()}

    async def _start_hosts(self) -> None:
        """Start every model's worker; one that cannot start fails alone and keeps retrying with backoff.

        The runner refuses to start only when no model of it could (a host-wide fault such as a
        missing sandbox layer), so one broken submission never takes its node-mates down.
        """
        hosts = list(self.hosts.values())
        outcomes = await asyncio.gather(*(host.start() for host in hosts), return_exceptions=True)
        failed = [(host, outcome) for host, outcome in zip(hosts, outcomes) if isinstance(outcome, BaseException)]
        for _host, error in failed:
            if not isinstance(error, WorkerGone):
                raise error
        if failed and len(failed) == len(hosts):
            raise failed[0][1]
        for host, error in failed:
            log.error("model %s could not start (%s); it retries with backoff, its node-mates serve", host.model_id, error,
                      extra=log_fields(model=host.model_id, node=self.settings.node_id, reason=error.code))
            host.keep_starting()

    async def start(self) -> int:
        await self._start_hosts()
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = self._server.add_secure_port(address, tls.reloading_server_credentials(
            self.settings.tls, PeerIdentity.make(self.settings.crunch_id, Role.RUNNER, self.settings.node_id)
        ))
        await self._server.start()
        try:
            await asyncio.to_thread(tls.check_tls13_only, self.settings.host, self.port, self.settings.tls)
            if self.metrics is not None:
                self.metrics_server = serve_metrics(self.metrics.registry, self.settings.metrics, self.settings.tls)
                self.metrics.serving()
        except ConfigError:
            await self.stop(0)
            raise
        await self.health.set("", SERVING)
        self._registry_watch = asyncio.get_running_loop().create_task(
            watch_registry(self._registry, self.health, REGISTRY_HEALTH_SERVICE)
        )
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        if self._registry_watch is not None:
            self._registry_watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await asyncio.gather(*(host.close() for host in self.hosts.values()))
        if self.template is not None:
            await self.template.close()
        self._registry.close()
        self.audit.close()
        if self.metrics_server is not None:
            self.metrics_server.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()
