"""The token auth interceptor: authenticate a call before its request is parsed.

For each protected method (unary request; unary or streamed response) it swaps
in a handler that receives the raw request bytes, so unauthenticated input never reaches the protobuf parser. The
decision itself is `smp.rules.authorize_call`; this module only gathers its
inputs (token metadata, peer certificate, method, clock, the registry snapshot,
this server's destination names), records every allow and deny (the audit line and
its count: transport/decisions.py), and turns refusals into gRPC statuses with a reason code.
Used by the runner (Setup, Call, FanOut, Reset: coordinator tokens) and the
orchestrator (WatchModels, ReportFailure: coordinator tokens; its operator RPCs:
operator tokens). Each protected method names the role it accepts.

Audit lines name the peer (`who`) and, as far as the token was read before a
refusal, the key that signed it (`kid`), the models it claims (`models`) and its
`nonce`. Any failure of the registry source, whatever its type, is a typed,
audited refusal (REGISTRY_UNAVAILABLE), never an unhandled exception.
`ServedKeys` gives a server's own names for the tokens' destination claim.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
import grpc
from google.protobuf.message import DecodeError

from secure_runner.errors import AuthError, ConfigError, ErrorCode, RequestError
from secure_runner.smp import rules
from secure_runner.smp.identity import Role
from secure_runner.smp.registry import RegistrySnapshot
from secure_runner.smp.replay import ReplayCache
from secure_runner.transport import tls
from secure_runner.transport.decisions import DecisionRecorder
from secure_runner.transport.status import TOKEN_KEY, abort
from secure_runner.transport.tls import PeerCertificates, peer_name

log = logging.getLogger(__name__)

class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Token-checks `protected_rpcs`: a mapping of full method name -> accepted role, or a collection
    of method names that accept the coordinator.

    `destinations` returns this server's names for the tokens' `dst` claim (the
    SHA-256 of each TLS public key it may be presenting, see `ServedKeys`).
    """

    def __init__(
        self,
        crunch_id: str,
        protected_rpcs: Mapping[str, Role] | Collection[str],
        registry: Callable[[], RegistrySnapshot],
        decisions: DecisionRecorder,
        *,
        replay: ReplayCache,
        destinations: Callable[[], frozenset[str]],
        policy: rules.TimePolicy = rules.TimePolicy(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._crunch_id = crunch_id
        if not isinstance(protected_rpcs, Mapping):
            protected_rpcs = dict.fromkeys(protected_rpcs, Role.COORDINATOR)
        self._protected = {rpc: Role(role) for rpc, role in protected_rpcs.items()}
        self._registry = registry
        self._destinations = destinations
        self._decisions = decisions
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

    def _snapshot(self) -> RegistrySnapshot:
        """The registry source's current snapshot; any failure of the source becomes a ConfigError."""
        try:
            return self._registry()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - an adapter's bug or outage: a typed refusal, never a traceback
            log.exception("registry source failed")
            failed = f"the registry source failed: {type(exc).__name__}"
            raise ConfigError(ErrorCode.REGISTRY_UNAVAILABLE, failed) from None

    async def _authorize(self, rpc: str, raw: bytes, context: grpc.aio.ServicerContext, parse):
        """The parsed request if SMP-1..14 pass; otherwise audit, abort with the reason code."""
        tokens = [v for k, v in context.invocation_metadata() or () if k == TOKEN_KEY]
        peer = self._peers.from_auth_context(context.auth_context())
        who = peer_name(peer)
        what = {"rpc": rpc}  # filled with the token's kid, models and nonce as they are read
        try:
            if peer is None:
                raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, "no client certificate")
            ctx = rules.CallContext(
                crunch_id=self._crunch_id,
                rpc=rpc,
                peer_spiffe_ids=peer.spiffe_ids,
                peer_cert_sha256=peer.sha256,
                peer_spki_sha256=peer.spki_sha256,
                body=raw,
                now=int(self._clock()),
                started_at=self._started_at,
                destinations=self._destinations(),
                role=self._protected[rpc],
            )
            claims, request = rules.authorize_call(
                tokens, ctx, self._snapshot(), self._replay, parse, self._policy, seen=what
            )
        except (AuthError, RequestError, ConfigError) as exc:
            log.warning("refused %s from %s: %s", rpc, who, exc)
            self._decisions.deny(exc.code, who, what)
            await abort(context, exc)
        subject, targets = rules.subject_and_targets(request)
        what.update(subject=subject, models=",".join(targets)[:200], method=claims.method)
        self._decisions.allow(who, what)
        return request


def _parser(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except DecodeError:
            raise RequestError(ErrorCode.MALFORMED_REQUEST, "request is not a valid message") from None

    return parse


class ServedKeys:
    """This server's names for the tokens' `dst` claim: SHA-256 of the TLS public key(s) it serves.

    The certificate file is re-read at most once per `check_interval` when it changed
    (a renewal with `--new-keys`). The previous key stays a valid destination too,
    since connections opened before the renewal keep presenting it until recycled.
    """

    def __init__(self, cert: Path, check_interval: float = 1.0) -> None:
        self._cert = cert
        self._check_interval = check_interval
        self._version = tls.file_version(self._cert)
        try:
            self._latest = self._read()
        except (OSError, ValueError, AuthError) as exc:
            raise ConfigError(ErrorCode.PKI_INVALID, f"cannot read the served certificate {cert}: {exc}") from None
        self._keys = frozenset({self._latest})
        self._next_check = time.monotonic() + check_interval

    def _read(self) -> str:
        return tls.spki_sha256(tls.pem_to_der(self._cert.read_bytes()))

    def __call__(self) -> frozenset[str]:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._check_interval
            version = tls.file_version(self._cert)
            if version != self._version:
                self._version = version
                try:
                    latest = self._read()
                except (OSError, ValueError, AuthError) as exc:
                    log.warning("keeping the served key names: %s", exc)
                else:
                    if latest != self._latest:
                        self._keys, self._latest = frozenset({latest, self._latest}), latest
        return self._keys
