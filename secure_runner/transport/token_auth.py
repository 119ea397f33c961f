"""The token auth interceptor: authenticate a call before its request is parsed.

For each protected method (unary request; unary or streamed response) it swaps
in a handler that receives the raw request bytes, so unauthenticated input never reaches the protobuf parser. The
decision itself is `smp.rules.authorize_call`; this module only gathers its
inputs (token metadata, peer certificate, method, clock), writes every allow and
deny to the audit log, and turns refusals into gRPC statuses with a reason code.
Used by the runner (Setup, Call, FanOut, Reset) and the orchestrator (ReportFailure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError

from secure_runner.errors import AuthError, ErrorCode, RequestError
from secure_runner.smp import rules
from secure_runner.smp.registry import Registry
from secure_runner.smp.replay import ReplayCache
from secure_runner.transport.status import TOKEN_KEY, abort
from secure_runner.transport.tls import PeerCertificates, peer_name

log = logging.getLogger(__name__)

class AuditSink(Protocol):
    def record(self, *, decision: str, code: str, who: str, what: dict[str, str]) -> None: ...


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        crunch_id: str,
        protected_rpcs: Collection[str],
        registry: Callable[[], Registry],
        audit: AuditSink,
        *,
        replay: ReplayCache,
        policy: rules.TimePolicy = rules.TimePolicy(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._crunch_id = crunch_id
        self._protected = frozenset(protected_rpcs)
        self._registry = registry
        self._audit = audit
        self._replay = replay
        self._policy = policy
        self._clock = clock
        self._started_at = int(clock())
        self._peers = PeerCertificates()
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # built once per method

    async def intercept_service(self, continuation, handler_call_details):
        rpc = handler_call_details.method
        if rpc not in self._protected:
            return await continuation(handler_call_details)
        wrapped = self._wrapped.get(rpc)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[rpc] = self._wrap(rpc, handler)
        return wrapped

    def _wrap(self, rpc: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The method's handler, taking raw bytes and authorizing them before anything else."""
        parse = _parser(handler.request_deserializer)
        serialize = handler.response_serializer

        if handler.unary_stream is not None:  # a fan-out: results streamed back

            async def authenticated_stream(raw: bytes, context: grpc.aio.ServicerContext):
                request = await self._authorize(rpc, raw, context, parse)
                async for result in handler.unary_stream(request, context):
                    yield result

            return grpc.unary_stream_rpc_method_handler(authenticated_stream, response_serializer=serialize)

        async def authenticated(raw: bytes, context: grpc.aio.ServicerContext):
            return await handler.unary_unary(await self._authorize(rpc, raw, context, parse), context)

        return grpc.unary_unary_rpc_method_handler(authenticated, response_serializer=serialize)

    async def _authorize(self, rpc: str, raw: bytes, context: grpc.aio.ServicerContext, parse):
        """The parsed request if SMP-1..14 pass; otherwise audit, abort with the reason code."""
        tokens = [v for k, v in context.invocation_metadata() or () if k == TOKEN_KEY]
        peer = self._peers.from_auth_context(context.auth_context())
        who = peer_name(peer)
        try:
            if peer is None:
                raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, "no client certificate")
            ctx = rules.CallContext(
                crunch_id=self._crunch_id,
                rpc=rpc,
                peer_spiffe_ids=peer.spiffe_ids,
                peer_cert_sha256=peer.sha256,
                body=raw,
                now=int(self._clock()),
                started_at=self._started_at,
            )
            claims, request = rules.authorize_call(tokens, ctx, self._registry(), self._replay, parse, self._policy)
        except (AuthError, RequestError) as exc:
            log.warning("refused %s from %s: %s", rpc, who, exc)
            self._audit.record(decision="deny", code=exc.code, who=who, what={"rpc": rpc})
            await abort(context, exc)
        subject, targets = rules.subject_and_targets(request)
        self._audit.record(
            decision="allow",
            code="OK",
            who=who,
            what={"rpc": rpc, "subject": subject, "models": ",".join(targets)[:200], "method": claims.method,
                  "nonce": claims.nonce},
        )
        return request


def _parser(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except DecodeError:
            raise RequestError(ErrorCode.MALFORMED_REQUEST, "request is not a valid message") from None

    return parse
