"""The Orchestrator service: the model list for authorized coordinators, and failure reports.

WatchModels and ReportFailure are token-authenticated by the interceptor like
every runner call (SMP-1..14, before the request is parsed): a coordinator
certificate without its signing key cannot read the model list. WatchModels is
a long-lived stream, so authorization (SMP-20) is not checked only once: it is
re-checked against the current registry before every snapshot and at least every
`reauthorize_seconds`, and a watcher whose key was revoked is cut off within
that bound.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from secure_runner import pki
from secure_runner.errors import AuthError, ConfigError, ErrorCode
from secure_runner.metrics import ProcessMetrics
from secure_runner.orchestrator import operator
from secure_runner.smp import rules
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.registry import RegistrySnapshot
from secure_runner.smp.replay import ReplayCache
from secure_runner.transport import tls
from secure_runner.transport.audit_log import AuditLog
from secure_runner.transport.decisions import DecisionRecorder
from secure_runner.transport.gate import PeerGate
from secure_runner.transport.registry_file import audit_registry_failure, open_registry_source
from secure_runner.transport.status import abort
from secure_runner.transport.tls import PeerCertificates, peer_name
from secure_runner.transport.token_auth import ServedKeys, TokenAuthInterceptor
from secure_runner.v1 import orchestrator_pb2, orchestrator_pb2_grpc

log = logging.getLogger(__name__)

WATCH_RPC = "/secure_runner.v1.Orchestrator/WatchModels"
REPORT_RPC = "/secure_runner.v1.Orchestrator/ReportFailure"


class ModelBoard:
    """The current model list; watchers wait on it for the next revision."""

    def __init__(self, crunch_id: str) -> None:
        self.crunch_id = crunch_id
        self._models: dict[str, orchestrator_pb2.ModelInfo] = {}
        self._revision = 0
        self._changed = asyncio.Condition()

    async def put(self, info: orchestrator_pb2.ModelInfo) -> None:
        async with self._changed:
            self._models[info.model_id] = info
            self._revision += 1
            self._changed.notify_all()

    def states(self) -> list[int]:
        """Each model's state; safe from another thread (a metrics scrape): the dict is copied atomically."""
        return [info.state for info in list(self._models.values())]

    def get(self, model_id: str) -> orchestrator_pb2.ModelInfo | None:
        return self._models.get(model_id)

    def snapshot(self) -> orchestrator_pb2.ModelList:
        return orchestrator_pb2.ModelList(
            crunch_id=self.crunch_id, revision=self._revision, models=list(self._models.values())
        )

    async def wait_after(self, revision: int, timeout: float) -> orchestrator_pb2.ModelList | None:
        """The next snapshot after `revision`, or None if nothing changed within `timeout`."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._revision > revision), timeout)
            except TimeoutError:
                return None
            return self.snapshot()


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(
        self,
        board: ModelBoard,
        registry: Callable[[], RegistrySnapshot],
        decisions: DecisionRecorder,
        stop_model: Callable[[str, str], Awaitable[bool]],
        *,
        reauthorize_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._board = board
        self._registry = registry
        self._decisions = decisions
        self._stop_model = stop_model
        self._reauthorize_seconds = reauthorize_seconds
        self._clock = clock
        self._peers = PeerCertificates()

    async def _authorize_watcher(self, request, context, peer) -> None:
        who = peer_name(peer)
        try:
            if peer is None:
                raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, "no client certificate")
            rules.authorize_watcher(
                self._board.crunch_id, request.crunch_id, peer.spiffe_ids, peer.spki_sha256, self._registry(),
                int(self._clock()),
            )
        except (AuthError, ConfigError) as exc:
            log.warning("refused model-list watcher %s: %s", who, exc)
            self._decisions.deny(exc.code, who, {"rpc": WATCH_RPC})
            await abort(context, exc)

    async def WatchModels(self, request, context):
        peer = self._peers.from_auth_context(context.auth_context())
        await self._authorize_watcher(request, context, peer)  # the interceptor audited the token's allow line
        snapshot = self._board.snapshot()
        while True:
            yield snapshot
            while (update := await self._board.wait_after(snapshot.revision, self._reauthorize_seconds)) is None:
                await self._authorize_watcher(request, context, peer)
            await self._authorize_watcher(request, context, peer)
            snapshot = update

    async def ReportFailure(self, request, context):
        stopped = await self._stop_model(request.model_id, request.deployment_id)
        log.warning(
            "model %s (%s) reported by the coordinator: %s %s; stopped=%s",
            request.model_id, request.deployment_id, request.reason, request.message[:200], stopped,
        )
        self._decisions.allow(
            peer_name(self._peers.from_auth_context(context.auth_context())),
            {"rpc": REPORT_RPC, "model": request.model_id, "deployment": request.deployment_id,
             "reason": request.reason[:64]},
            code="FAILURE_REPORTED",
        )
        return orchestrator_pb2.FailureReportAck(stopped=stopped)


class OrchestratorServer:
    """The orchestrator's network face: `board` served over mTLS, failure reports token-checked and audited.

    Whatever keeps the board current (the local orchestrator's runner processes, or
    an operator's list of runners running elsewhere) passes `stop_model`, which
    receives the authenticated reports and must ignore ones for old deployments.
    Its decisions are counted in `metrics` (a ProcessMetrics of its own if none is given).
    """

    def __init__(
        self,
        board: ModelBoard,
        layout: pki.PkiLayout,
        audit_file: Path,
        stop_model: Callable[[str, str], Awaitable[bool]],
        operator_control: operator.OperatorControl | None = None,
        chain_config: Path | None = None,
        metrics: ProcessMetrics | None = None,
    ) -> None:
        self.layout = layout
        self.identity = PeerIdentity.make(board.crunch_id, Role.ORCHESTRATOR, "orchestrator")
        self.tls_files = tls.TlsFiles(layout.orchestrator_cert, layout.orchestrator_key, layout.ca_cert)
        self.audit = AuditLog(audit_file)
        self.metrics = metrics or ProcessMetrics()
        self.decisions = DecisionRecorder(self.audit, self.metrics)
        self.registry = open_registry_source(  # the layout's registry file, or the chain given its configuration
            layout.registry, chain_config, on_failure=functools.partial(audit_registry_failure, self.decisions))
        replay = ReplayCache()
        auth = TokenAuthInterceptor(
            board.crunch_id,
            {WATCH_RPC: Role.COORDINATOR, REPORT_RPC: Role.COORDINATOR, **operator.PROTECTED_RPCS},
            self.registry.current, self.decisions,
            replay=replay, destinations=ServedKeys(layout.orchestrator_cert),
        )
        self.metrics.watch(replay=replay, registry_fetched_at=lambda: self.registry.fetched_at, tls=self.tls_files)
        tls.raise_open_file_limit()
        gate = PeerGate(board.crunch_id, self.decisions, roles=operator.PROTECTED_RPCS)
        self._server = grpc.aio.server(interceptors=[gate, auth], options=tls.server_options())
        orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(
            OrchestratorServicer(board, self.registry.current, self.decisions, stop_model), self._server
        )
        if operator_control is not None:  # the operator RPCs, for the OPERATOR role only
            operator.add_to_server(self._server, board.crunch_id, operator_control, self.decisions)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        files = self.tls_files
        bound = self._server.add_secure_port(f"{host}:{port}", tls.reloading_server_credentials(files, self.identity))
        await self._server.start()
        try:
            await asyncio.to_thread(tls.check_tls13_only, host, bound, files)
        except ConfigError:
            await self.stop(0)
            raise
        return bound

    async def stop(self, grace: float = 0.5) -> None:
        await self._server.stop(grace)
        self.registry.close()
        self.audit.close()
