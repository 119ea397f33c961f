"""The runner's auth interceptor: authenticate every ModelRunner call before parsing it.

It replaces each ModelRunner handler with one that receives the raw request
bytes, so unauthenticated input is never handed to the protobuf parser. The
decision itself is `smp.rules`; this module only gathers its inputs (token
metadata, peer certificate, method, clock) and turns refusals into gRPC
statuses with a reason code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from secure_runner.errors import AuthError, ErrorCode, RequestError
from secure_runner.smp import rules
from secure_runner.smp.registry import Registry
from secure_runner.transport.status import TOKEN_KEY, abort
from secure_runner.transport.tls import PeerCertificates

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/secure_runner.v1.ModelRunner/"


class CallAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        crunch_id: str,
        registry: Callable[[], Registry],
        policy: rules.TimePolicy = rules.TimePolicy(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._crunch_id = crunch_id
        self._registry = registry
        self._policy = policy
        self._clock = clock
        self._peers = PeerCertificates()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        rpc = handler_call_details.method
        if handler is None or not rpc.startswith(SERVICE_PREFIX):
            return handler
        tokens = [v for k, v in handler_call_details.invocation_metadata or () if k == TOKEN_KEY]

        async def authenticated(raw: bytes, context: grpc.aio.ServicerContext):
            try:
                claims = self._verify(rpc, tokens, raw, context)
            except AuthError as exc:
                log.warning("refused %s: %s", rpc, exc)
                await abort(context, exc)
            try:
                request = handler.request_deserializer(raw)
            except DecodeError:
                await abort(context, RequestError(ErrorCode.MALFORMED_REQUEST, "request is not a valid message"))
            try:
                rules.check_request_target(claims, request.model_id, getattr(request, "method", ""))
            except AuthError as exc:
                log.warning("refused %s: %s", rpc, exc)
                await abort(context, exc)
            return await handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            authenticated, request_deserializer=None, response_serializer=handler.response_serializer
        )

    def _verify(self, rpc: str, tokens: list[bytes], raw: bytes, context) -> rules.CallClaims:
        peer = self._peers.from_auth_context(context.auth_context())
        if peer is None:
            raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, "no client certificate")
        ctx = rules.CallContext(
            crunch_id=self._crunch_id,
            rpc=rpc,
            peer_spiffe_ids=peer.spiffe_ids,
            peer_cert_sha256=peer.sha256,
            body=raw,
            now=int(self._clock()),
        )
        return rules.verify_call(tokens, ctx, self._registry(), self._policy)
