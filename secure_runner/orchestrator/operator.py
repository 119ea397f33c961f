"""The Operator service: list, stop, redeploy, restart and read the logs of a crunch's models.

Served on the orchestrator's mTLS port beside the Orchestrator service. Every RPC
here is token-protected for the OPERATOR role only (`PROTECTED_RPCS`, checked by
the token interceptor before the request is parsed: SMP-1..14 with an operator
certificate `spiffe://<crunch>/operator/<key-id>` and a key of the registry's
`operators` section). A coordinator's or a runner's certificate is refused there
(PEER_UNAUTHENTICATED), whatever its token.

Every action is audited twice: the interceptor's allow line (who, which RPC,
which subject), and this servicer's line saying what was done (`done` true or
false). The orchestrator logs each stop, redeploy and restart on its own.
"""

from __future__ import annotations

import logging
from typing import Protocol

import grpc

from secure_runner.errors import ErrorCode, RequestError
from secure_runner.orchestrator.store import ModelRecord
from secure_runner.runner.call_stats import CallStats
from secure_runner.smp.identity import Role
from secure_runner.transport.status import abort
from secure_runner.transport.tls import PeerCertificates, peer_name
from secure_runner.transport.decisions import DecisionRecorder
from secure_runner.v1 import operator_pb2, operator_pb2_grpc, runner_pb2

log = logging.getLogger(__name__)

SERVICE = "/secure_runner.v1.Operator/"
PROTECTED_RPCS = {
    SERVICE + name: Role.OPERATOR for name in operator_pb2.DESCRIPTOR.services_by_name["Operator"].methods_by_name
}
MAX_LOG_LINES = 1000


class OperatorControl(Protocol):
    """What the orchestrator gives its operators (LocalOrchestrator implements it)."""

    def records(self) -> list[ModelRecord]: ...
    def node_of(self, model_id: str) -> str | None: ...
    async def stop_model(self, model_id: str, deployment_id: str | None, why: str) -> bool: ...
    async def redeploy(self, model_id: str) -> bool: ...
    async def restart_node(self, node_id: str) -> bool: ...
    async def model_logs(self, model_id: str, lines: int) -> list[str]: ...


class OperatorServicer(operator_pb2_grpc.OperatorServicer):
    def __init__(self, crunch_id: str, control: OperatorControl, decisions: DecisionRecorder) -> None:
        self._crunch_id = crunch_id
        self._control = control
        self._decisions = decisions
        self._peers = PeerCertificates()

    def _record(self, context, rpc: str, subject: str, done: bool, detail: str = "") -> None:
        who = peer_name(self._peers.from_auth_context(context.auth_context()))
        log.info("operator %s: %s %s -> %s %s", who, rpc, subject, "done" if done else "not done", detail)
        self._decisions.allow(who, {"rpc": SERVICE + rpc, "subject": subject, "done": str(done).lower()},
                              code="OK" if done else "NOT_DONE")

    async def _known(self, model_id: str, context) -> None:
        if self._control.node_of(model_id) is None:
            await abort(context, RequestError(ErrorCode.MODEL_UNKNOWN, f"no model {model_id[:64]!r} in this crunch"))

    async def ListModels(self, request, context):
        if request.crunch_id != self._crunch_id:
            await abort(context, RequestError(ErrorCode.MODEL_UNKNOWN, f"this orchestrator serves {self._crunch_id!r}"))
        records = self._control.records()
        self._record(context, "ListModels", request.crunch_id, True, f"{len(records)} models")
        return operator_pb2.OperatorModelList(crunch_id=self._crunch_id, models=[
            operator_pb2.OperatorModel(
                info=r.info, restarts=r.restarts, last_failure_code=r.failure_code,
                last_failure_message=r.failure_message, last_failure_ms=r.failure_ms, calls=_counters(r.calls),
            )
            for r in records
        ])

    async def StopModel(self, request, context):
        await self._known(request.model_id, context)
        done = await self._control.stop_model(request.model_id, None, "stopped by an operator")
        self._record(context, "StopModel", request.model_id, done)
        return operator_pb2.OperatorAck(done=done, detail="" if done else "not running")

    async def RedeployModel(self, request, context):
        await self._known(request.model_id, context)
        done = await self._control.redeploy(request.model_id)
        self._record(context, "RedeployModel", request.model_id, done)
        return operator_pb2.OperatorAck(done=done, detail="" if done else "not running or stopped")

    async def RestartNode(self, request, context):
        on_node = {r.info.model_id for r in self._control.records() if r.info.node_id == request.node_id}
        if not on_node or not set(request.model_ids) <= on_node:
            await abort(context, RequestError(ErrorCode.MODEL_UNKNOWN, f"no node {request.node_id[:64]!r} with those models"))
        done = await self._control.restart_node(request.node_id)
        self._record(context, "RestartNode", request.node_id, done)
        return operator_pb2.OperatorAck(done=done, detail="" if done else "no model deployed on it")

    async def ModelLogs(self, request, context):
        await self._known(request.model_id, context)
        lines = await self._control.model_logs(request.model_id, min(request.lines or 100, MAX_LOG_LINES))
        self._record(context, "ModelLogs", request.model_id, True, f"{len(lines)} lines")
        return operator_pb2.OperatorLogs(model_id=request.model_id, lines=lines)


def _counters(calls: CallStats | None) -> operator_pb2.ModelCallCounters | None:
    if calls is None:
        return None
    fields = calls.fields()
    last = fields.pop("last_status")
    status = runner_pb2.CallStatus.Value(f"CALL_STATUS_{last}") if last else runner_pb2.CALL_STATUS_UNSPECIFIED
    return operator_pb2.ModelCallCounters(**fields, last_status=status)


def add_to_server(server: grpc.aio.Server, crunch_id: str, control: OperatorControl,
                  decisions: DecisionRecorder) -> None:
    operator_pb2_grpc.add_OperatorServicer_to_server(OperatorServicer(crunch_id, control, decisions), server)
