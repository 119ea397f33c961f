"""The Orchestrator servicer: stream model-list snapshots to authorized coordinators."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from secure_runner.errors import AuthError, ErrorCode
from secure_runner.smp import rules
from secure_runner.smp.registry import Registry
from secure_runner.transport.status import abort
from secure_runner.transport.tls import PeerCertificates
from secure_runner.v1 import orchestrator_pb2, orchestrator_pb2_grpc

log = logging.getLogger(__name__)


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

    def get(self, model_id: str) -> orchestrator_pb2.ModelInfo | None:
        return self._models.get(model_id)

    def snapshot(self) -> orchestrator_pb2.ModelList:
        return orchestrator_pb2.ModelList(
            crunch_id=self.crunch_id, revision=self._revision, models=list(self._models.values())
        )

    async def wait_after(self, revision: int) -> orchestrator_pb2.ModelList:
        async with self._changed:
            await self._changed.wait_for(lambda: self._revision > revision)
            return self.snapshot()


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(
        self, board: ModelBoard, registry: Callable[[], Registry], clock: Callable[[], float] = time.time
    ) -> None:
        self._board = board
        self._registry = registry
        self._clock = clock
        self._peers = PeerCertificates()

    async def WatchModels(self, request, context):
        peer = self._peers.from_auth_context(context.auth_context())
        try:
            if peer is None:
                raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, "no client certificate")
            watcher = rules.authorize_watcher(
                self._board.crunch_id, request.crunch_id, peer.spiffe_ids, self._registry(), int(self._clock())
            )
        except AuthError as exc:
            log.warning("refused model-list watcher: %s", exc)
            await abort(context, exc)
        log.info("model list watched by %s", watcher.spiffe_id)
        snapshot = self._board.snapshot()
        while True:
            yield snapshot
            snapshot = await self._board.wait_after(snapshot.revision)
