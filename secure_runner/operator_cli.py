"""`secure-runner models ...`: an operator lists and steers a crunch's models through the orchestrator.

    secure-runner models list                    every model: state (reason, since), node, address,
                                                 deployment, restarts, last failure
    secure-runner models stop MODEL              stop one model for good (its node-mates carry on)
    secure-runner models redeploy MODEL          a new deployment of one model (a stopped one comes back)
    secure-runner models restart-node NODE       a new runner for a node: its models get new deployments
    secure-runner models logs MODEL [-n LINES]   the last lines the model's worker wrote

Each command is one call to the orchestrator's Operator service over mutual TLS,
with the operator's certificate (`spiffe://<crunch>/operator/<key-id>`) and a call
token signed by the operator's registered Ed25519 key, bound to that certificate
and to the orchestrator's TLS key; the orchestrator audits every one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from secure_runner import pki
from secure_runner.client.security import CallSigner, CoordinatorSecurity
from secure_runner.errors import SecureRunnerError
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.rules import subject_and_targets
from secure_runner.smp.token import split_model_id
from secure_runner.transport import tls
from secure_runner.transport.status import TOKEN_KEY, reason_of
from secure_runner.v1 import operator_pb2, orchestrator_pb2

SERVICE = "/secure_runner.v1.Operator/"
CALL_TIMEOUT_SECONDS = 60.0  # a stop waits for the model's call in progress


@dataclass(frozen=True)
class OperatorCredentials:
    tls: tls.TlsFiles
    identity_key: Path

    @classmethod
    def from_pki_dir(cls, root: Path | str) -> OperatorCredentials:
        layout = pki.PkiLayout(Path(root))
        return cls(tls.TlsFiles(layout.operator_cert, layout.operator_key, layout.ca_cert), layout.operator_identity)


class OperatorClient:
    """One mTLS channel to an orchestrator's Operator service; each call signed for it alone."""

    def __init__(self, crunch_id: str, host: str, port: int, credentials: OperatorCredentials) -> None:
        self._crunch_id = crunch_id
        self._host, self._port = host, port
        self._credentials = credentials
        self._signer = CallSigner(CoordinatorSecurity(credentials.tls, credentials.identity_key, Path()), crunch_id)
        self._server_name = PeerIdentity.make(crunch_id, Role.ORCHESTRATOR, "orchestrator").tls_server_name
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> OperatorClient:
        der = await asyncio.to_thread(
            tls.fetch_server_certificate, self._host, self._port, self._credentials.tls, self._server_name
        )
        self._destination = tls.spki_sha256(der)  # the token names this orchestrator's key (`dst`)
        creds, self._cert_sha256 = tls.client_credentials(self._credentials.tls)
        self._channel = grpc.aio.secure_channel(
            f"{self._host}:{self._port}", creds, options=tls.channel_options(self._server_name)
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    def signed(self, rpc: str, request) -> tuple[bytes, tuple[tuple[str, bytes]]]:
        """The request's bytes and the metadata carrying its token, signed for `rpc` on this orchestrator."""
        body = request.SerializeToString()  # field 1, the subject, comes first
        _subject, targets = subject_and_targets(request)
        token = self._signer.sign(
            audience=targets, destinations=[self._destination], cert_sha256=self._cert_sha256,
            rpc=rpc, method="", shared_body=split_model_id(body)[1],
        )
        return body, ((TOKEN_KEY, token),)

    async def call(self, name: str, request, response_type):
        body, metadata = self.signed(SERVICE + name, request)
        stub = self._channel.unary_unary(SERVICE + name, response_deserializer=response_type.FromString)
        return await stub(body, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)

    async def list(self) -> operator_pb2.OperatorModelList:
        return await self.call(
            "ListModels", operator_pb2.OperatorListRequest(crunch_id=self._crunch_id), operator_pb2.OperatorModelList
        )

    async def stop(self, model_id: str) -> operator_pb2.OperatorAck:
        return await self.call("StopModel", operator_pb2.OperatorModelRequest(model_id=model_id), operator_pb2.OperatorAck)

    async def redeploy(self, model_id: str) -> operator_pb2.OperatorAck:
        return await self.call(
            "RedeployModel", operator_pb2.OperatorModelRequest(model_id=model_id), operator_pb2.OperatorAck
        )

    async def restart_node(self, node_id: str) -> operator_pb2.OperatorAck:
        models = [m.info.model_id for m in (await self.list()).models if m.info.node_id == node_id]
        request = operator_pb2.OperatorNodeRequest(node_id=node_id, model_ids=models)
        return await self.call("RestartNode", request, operator_pb2.OperatorAck)

    async def logs(self, model_id: str, lines: int) -> operator_pb2.OperatorLogs:
        request = operator_pb2.OperatorLogsRequest(model_id=model_id, lines=lines)
        return await self.call("ModelLogs", request, operator_pb2.OperatorLogs)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ms else "-"


def format_models(listing: operator_pb2.OperatorModelList) -> str:
    header = (f"{'model':<20} {'state':<10} {'since':<20} {'node':<16} {'address':<21} {'deployment':<28} "
              f"{'restarts':>8}  last failure")
    lines = [header]
    for model in listing.models:
        info = model.info
        state = orchestrator_pb2.ModelState.Name(info.state).removeprefix("MODEL_STATE_")
        failure = (f"{model.last_failure_code}: {model.last_failure_message} ({_when(model.last_failure_ms)})"
                   if model.last_failure_code else "-")
        lines.append(
            f"{info.model_id:<20} {state:<10} {_when(info.state_since_ms):<20} {info.node_id:<16} "
            f"{info.address or '-':<21} {info.deployment_id:<28} {model.restarts:>8}  {failure[:120]}"
        )
        if info.state_reason:
            lines.append(f"{'':<20} reason: {info.state_reason[:200]}")
    return "\n".join(lines)


def add_connection_flags(parser: argparse.ArgumentParser, party: str) -> None:
    """The crunch, the orchestrator's address, and the credentials of `party` (operator or coordinator)."""
    parser.add_argument("--crunch", required=True, help="the crunch id")
    parser.add_argument("--host", default="127.0.0.1", help="the orchestrator's host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9091, help="the orchestrator's port (default 9091)")
    parser.add_argument("--pki", type=Path, help=f"a `pki init` folder: its {party}/ files are used")
    parser.add_argument("--cert", type=Path, help=f"the {party}'s TLS certificate (default: from --pki)")
    parser.add_argument("--key", type=Path, help="its TLS key (default: from --pki)")
    parser.add_argument("--ca", type=Path, help="the crunch CA certificate (default: from --pki)")
    parser.add_argument("--identity", type=Path, help=f"the {party}'s Ed25519 signing key (default: from --pki)")


def credentials_from(args: argparse.Namespace, party: str) -> OperatorCredentials | None:
    """The files given, the rest from --pki's `party` files; None if a file is missing and --pki was not given."""
    if args.pki is None and None in (args.cert, args.key, args.ca, args.identity):
        return None
    layout = pki.PkiLayout(args.pki or Path())
    cert, key, identity = {
        "operator": (layout.operator_cert, layout.operator_key, layout.operator_identity),
        "coordinator": (layout.coordinator_cert, layout.coordinator_key, layout.coordinator_identity),
    }[party]
    return OperatorCredentials(tls.TlsFiles(args.cert or cert, args.key or key, args.ca or layout.ca_cert),
                               args.identity or identity)


async def _run(args: argparse.Namespace, credentials: OperatorCredentials) -> int:
    async with OperatorClient(args.crunch, args.host, args.port, credentials) as client:
        if args.action == "list":
            print(format_models(await client.list()))
            return 0
        if args.action == "logs":
            print("\n".join((await client.logs(args.model, args.lines)).lines))
            return 0
        ack = await {"stop": client.stop, "redeploy": client.redeploy, "restart-node": client.restart_node}[
            args.action](args.target)
        print(f"{args.action} {args.target}: {'done' if ack.done else 'not done: ' + ack.detail}")
        return 0 if ack.done else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secure-runner models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_flags(parser, "operator")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every model with its state, node, address, deployment, restarts, last failure")
    for name, what, target in (("stop", "stop one model", "MODEL"), ("redeploy", "redeploy one model", "MODEL"),
                               ("restart-node", "restart one node's runner", "NODE")):
        actions.add_parser(name, help=what).add_argument("target", metavar=target, help="its id")
    logs = actions.add_parser("logs", help="the last lines a model's worker wrote")
    logs.add_argument("model", metavar="MODEL", help="its id")
    logs.add_argument("-n", "--lines", type=int, default=100, help="how many lines (default 100, at most 1000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    credentials = credentials_from(args, "operator")
    if credentials is None:
        print("secure-runner models: give --pki, or each of --cert, --key, --ca, --identity", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, credentials))
    except grpc.aio.AioRpcError as exc:
        print(f"secure-runner models: refused: {exc.code().name} {reason_of(exc) or ''}: {exc.details()}",
              file=sys.stderr)
        return 2
    except SecureRunnerError as exc:
        print(f"secure-runner models: error: {exc}", file=sys.stderr)
        return 2

