"""The peer gate: judge the peer's certificate before a single request byte is read.

gRPC reads and decompresses a unary request in full before its handler runs
(an interceptor sees the method and metadata first, but not the peer), so
checking the caller in the handler lets anyone holding a crunch certificate
make a server hold `streams x message cap` bytes per connection. The gate runs first (the outermost interceptor) and serves every
method of the server as a request-*streaming* handler: grpc then reads nothing
until the handler asks, and the handler asks only once the peer passed SMP-1 /
SMP-21 for that method (a certificate of this crunch naming a role allowed to
call it: the coordinator, unless the server says otherwise). Until then a
stream's body waits in its HTTP/2 flow-control window (64 KiB: see
`tls.SERVER_OPTIONS`), not in our memory.

The gate also records what grpc would otherwise refuse unseen: calls to methods
this server does not have (RPC_UNIMPLEMENTED) and requests over the message cap
(MESSAGE_TOO_LARGE), whoever sent them. Compressed requests are refused by grpc
itself (see `tls.SERVER_OPTIONS`) and recorded only if the gate refuses their sender.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Collection, Mapping

import grpc

from secure_runner.errors import AuthError, ErrorCode, RequestError, SecureRunnerError
from secure_runner.smp import rules
from secure_runner.smp.identity import Role
from secure_runner.transport.status import abort
from secure_runner.transport.tls import MAX_MESSAGE_BYTES, PeerCertificates, peer_name
from secure_runner.transport.decisions import DecisionRecorder

log = logging.getLogger(__name__)

__all__ = ["PeerGate"]


class PeerGate(grpc.aio.ServerInterceptor):
    """Admit to a method's request body only the roles allowed to call it; audit every refusal.

    `roles` maps a method to the role that may call it; every other method is for coordinators.
    """

    def __init__(self, crunch_id: str, decisions: DecisionRecorder, roles: Mapping[str, Role] | None = None) -> None:
        self._crunch_id = crunch_id
        self._decisions = decisions
        self._roles = dict(roles or {})
        self._peers = PeerCertificates()
        self._gated: dict[str, grpc.RpcMethodHandler] = {}  # one per method this server has

    async def intercept_service(self, continuation, handler_call_details):
        rpc = handler_call_details.method
        gated = self._gated.get(rpc)
        if gated is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # a name the peer chose: never cached
                return self._unimplemented(rpc)
            gated = self._gated[rpc] = self._gate(rpc, handler)
        return gated

    async def _refuse(self, context: grpc.aio.ServicerContext, rpc: str, error: SecureRunnerError) -> None:
        """Audit the refusal and end the call with it (raises)."""
        who = peer_name(self._peers.from_auth_context(context.auth_context()))
        log.debug("refused %s from %s: %s", rpc[:256], who, error)  # the audit log has it, counted
        self._decisions.deny(error.code, who, {"rpc": rpc})
        try:
            await abort(context, error)
        except grpc.aio.AbortError:
            raise
        except Exception:  # grpc already ended the call (a compressed request, a peer gone): nothing to send
            raise asyncio.CancelledError from None

    async def _admit(self, rpc: str, roles: Collection[Role], context: grpc.aio.ServicerContext) -> None:
        """SMP-1 / SMP-21 on the certificate alone; aborts (audited) before the body is read."""
        peer = self._peers.from_auth_context(context.auth_context())
        try:
            if peer is None:
                raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, "no client certificate")
            rules.authorize_peer(self._crunch_id, peer.spiffe_ids, roles)
        except AuthError as exc:
            await self._refuse(context, rpc, exc)

    async def _only_request(self, rpc: str, context: grpc.aio.ServicerContext):
        """The one request of a unary call, read only now.

        A unary client always sends one message, even an empty one. None arrives
        when it was over the message cap: grpc has then already answered
        RESOURCE_EXHAUSTED without telling the handler why, so the refusal
        recorded is MESSAGE_TOO_LARGE (or a hand-made stream that sent nothing).
        """
        request = await context.read()
        if request is grpc.aio.EOF:
            error = RequestError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"no request arrived: over the {MAX_MESSAGE_BYTES >> 20} MiB message cap, or none sent",
            )
            await self._refuse(context, rpc, error)
        return request

    def _gate(self, rpc: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` (unary request: every method of our servers) served request-streaming, peer admitted first."""
        deserialize, serialize = handler.request_deserializer, handler.response_serializer
        roles = (self._roles.get(rpc, Role.COORDINATOR),)
        if handler.unary_unary is not None:

            async def gated_unary(requests, context):
                await self._admit(rpc, roles, context)
                return await handler.unary_unary(await self._only_request(rpc, context), context)

            return grpc.stream_unary_rpc_method_handler(gated_unary, deserialize, serialize)
        if handler.unary_stream is None:
            raise TypeError(f"{rpc} takes a request stream: the peer gate serves unary requests only")

        if inspect.isasyncgenfunction(handler.unary_stream):  # a servicer that yields (FanOut, WatchModels)

            async def gated_stream(requests, context):
                await self._admit(rpc, roles, context)
                async for response in handler.unary_stream(await self._only_request(rpc, context), context):
                    yield response

        else:  # a servicer that writes with context.write (grpc health's Watch)

            async def gated_stream(requests, context):
                await self._admit(rpc, roles, context)
                await handler.unary_stream(await self._only_request(rpc, context), context)

        return grpc.stream_stream_rpc_method_handler(gated_stream, deserialize, serialize)

    def _unimplemented(self, rpc: str) -> grpc.RpcMethodHandler:
        async def refuse(requests, context):
            await self._refuse(context, rpc, RequestError(ErrorCode.RPC_UNIMPLEMENTED, "no such method"))

        return grpc.stream_unary_rpc_method_handler(refuse)
