"""The Secure Model Protocol's call rules, in the order they are checked.

Pure and I/O-free: callers pass in the token, the raw request bytes, what they
know about the connection, the registry, the replay cache and the clock. Each
rule raises `AuthError` (or `RequestError` for an unparsable request) with its
own stable code; SECURITY.md lists the test that proves each one.

Every token-protected call (runner Setup / Call / FanOut / Reset,
orchestrator ReportFailure) goes through `authorize_call`:

  SMP-1  The peer's certificate carries exactly one SPIFFE id and it names a
         coordinator of this crunch.                            PEER_UNAUTHENTICATED
  SMP-2  Exactly one token is present.                          TOKEN_MISSING, TOKEN_MALFORMED
  SMP-3  The token is at most MAX_TOKEN_BYTES.                  TOKEN_TOO_LARGE
  SMP-4  It is a PASETO v4.public token with a {"kid"} footer.  TOKEN_UNSUPPORTED_VERSION,
                                                                TOKEN_MALFORMED
  SMP-5  The key id is registered for this crunch, not revoked
         and inside its validity window.                        KEY_UNKNOWN, KEY_REVOKED,
                                                                KEY_NOT_VALID_NOW
  SMP-6  The signature verifies with that key under this
         protocol's implicit assertion.                         TOKEN_BAD_SIGNATURE
  SMP-7  The claims parse strictly (version 1, all fields,
         nothing extra) and name the footer's key id.           TOKEN_UNSUPPORTED_VERSION,
                                                                TOKEN_MALFORMED
  SMP-8  The claims name this crunch.                           TOKEN_WRONG_CRUNCH
  SMP-9  The claims name the gRPC method being called.          TOKEN_WRONG_METHOD
  SMP-10 iat <= now + skew; now - skew < exp;
         exp - iat <= max lifetime; iat >= the verifier's
         start time (its replay cache was empty before).        TOKEN_NOT_YET_VALID,
                                                                TOKEN_EXPIRED,
                                                                TOKEN_LIFETIME_TOO_LONG,
                                                                TOKEN_ISSUED_BEFORE_START
  SMP-11 The request starts with its model id field and the
         SHA-256 of the bytes after it equals `bh`.             TOKEN_BODY_MISMATCH
  SMP-12 SHA-256 of the peer's DER certificate equals `cnf`.    TOKEN_CERT_MISMATCH
  -- only now is the request parsed --                          MALFORMED_REQUEST
  SMP-13 The parsed request's subject (field 1: its model, or
         a fan-out's node) is the one in its prefix; every
         model it reaches is in the audience; its model method
         is the claimed one.                                    TOKEN_WRONG_AUDIENCE,
                                                                TOKEN_WRONG_METHOD
  SMP-14 The (nonce, subject) pair was never accepted before;
         the bounded cache refuses new tokens when full.        TOKEN_REPLAYED,
                                                                REPLAY_CACHE_FULL

Watching a crunch's model list (orchestrator, `authorize_watcher`):

  SMP-20 As SMP-1, the crunch asked for is this one, and the key
         id in the peer's SPIFFE id passes SMP-5.               PEER_UNAUTHENTICATED,
                                                                WATCHER_NOT_AUTHORIZED, KEY_*

A runner's identity, checked by the client before it sends any request
(`verify_delegation`; the TLS handshake has already pinned the runner's name
to the crunch CA):

  SMP-30 A delegation is present and at most MAX_DELEGATION_BYTES. DELEGATION_MISSING,
                                                                DELEGATION_MALFORMED
  SMP-31 The model is in the registry with a cruncher identity
         key (the registry's word, never the orchestrator's).   MODEL_NOT_REGISTERED
  SMP-32 The delegation is signed by that key (PASETO v4.public,
         implicit assertion `secure-runner runner delegation v1`). DELEGATION_BAD_SIGNATURE,
                                                                DELEGATION_MALFORMED
  SMP-33 Its claims parse strictly and name this crunch and model. DELEGATION_MALFORMED,
                                                                DELEGATION_WRONG_MODEL
  SMP-34 iat <= now + skew, now - skew < exp and
         exp - iat <= 31 days.                                  DELEGATION_EXPIRED
  SMP-35 It binds the TLS key the runner actually presented
         (SHA-256 of its SubjectPublicKeyInfo).                 DELEGATION_KEY_MISMATCH
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from nacl.signing import VerifyKey
from pydantic import ValidationError

from secure_runner.errors import AuthError, ErrorCode
from secure_runner.smp import paseto
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.registry import Registry, decode_public_key
from secure_runner.smp.replay import ReplayCache
from secure_runner.smp.token import (
    DELEGATION_ASSERTION,
    IMPLICIT_ASSERTION,
    MAX_DELEGATION_BYTES,
    MAX_DELEGATION_LIFETIME,
    MAX_TOKEN_BYTES,
    CallClaims,
    DelegationClaims,
    Footer,
    sha256_b64url,
    split_model_id,
)

_Parsed = TypeVar("_Parsed", Footer, CallClaims, DelegationClaims)


class ModelRequest(Protocol):
    """A model request (field 1 `model_id`) or a fan-out (field 1 `node_id`, plus `model_ids`)."""


def subject_and_targets(request: ModelRequest) -> tuple[str, list[str]]:
    """The id in the request's field 1, and the models the request reaches."""
    model_ids = getattr(request, "model_ids", None)
    if model_ids is not None:
        return request.node_id, list(model_ids)
    return request.model_id, [request.model_id]


_Request = TypeVar("_Request", bound=ModelRequest)


@dataclass(frozen=True)
class TimePolicy:
    skew_seconds: int = 5
    max_lifetime_seconds: int = 60


@dataclass(frozen=True)
class CallContext:
    """What the verifier knows about one incoming call before parsing it."""

    crunch_id: str
    rpc: str
    peer_spiffe_ids: tuple[str, ...]
    peer_cert_sha256: str
    body: bytes
    now: int
    started_at: int  # unix seconds when the verifier (and its replay cache) started


def authorize_coordinator_peer(crunch_id: str, peer_spiffe_ids: tuple[str, ...]) -> PeerIdentity:
    """SMP-1."""
    if len(peer_spiffe_ids) != 1:
        raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, "peer certificate must carry exactly one SPIFFE id")
    peer = PeerIdentity.parse(peer_spiffe_ids[0])
    if peer.crunch_id != crunch_id or peer.role is not Role.COORDINATOR:
        raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, f"{peer.spiffe_id} is not a coordinator of {crunch_id}")
    return peer


def authorize_watcher(
    crunch_id: str, requested_crunch_id: str, peer_spiffe_ids: tuple[str, ...], registry: Registry, now: int
) -> PeerIdentity:
    """SMP-20."""
    peer = authorize_coordinator_peer(crunch_id, peer_spiffe_ids)
    if requested_crunch_id != crunch_id:
        raise AuthError(ErrorCode.WATCHER_NOT_AUTHORIZED, f"this orchestrator serves crunch {crunch_id!r} only")
    registry.coordinator_key(crunch_id, peer.ident, datetime.fromtimestamp(now, UTC))
    return peer


def authorize_call(
    tokens: Sequence[bytes],
    ctx: CallContext,
    registry: Registry,
    replay: ReplayCache,
    parse: Callable[[bytes], _Request],
    policy: TimePolicy = TimePolicy(),
) -> tuple[CallClaims, _Request]:
    """SMP-1 to SMP-14, in order. `parse` must raise RequestError(MALFORMED_REQUEST)."""
    claims, prefix_id = verify_token(tokens, ctx, registry, policy)
    request = parse(ctx.body)
    subject, targets = subject_and_targets(request)
    outside = [model_id for model_id in targets if model_id not in claims.aud]
    if subject != prefix_id or outside or not targets:
        raise AuthError(ErrorCode.TOKEN_WRONG_AUDIENCE, f"token is not for {(outside or [subject])[0][:64]!r}")
    if getattr(request, "method", "") != claims.method:
        raise AuthError(ErrorCode.TOKEN_WRONG_METHOD, f"token is for model method {claims.method!r}")
    replay.insert(claims.nonce, subject, claims.exp, ctx.now - policy.skew_seconds)
    return claims, request


def verify_token(
    tokens: Sequence[bytes], ctx: CallContext, registry: Registry, policy: TimePolicy = TimePolicy()
) -> tuple[CallClaims, str]:
    """SMP-1 to SMP-12: everything checked on raw bytes. Returns the claims and the prefix model id."""
    authorize_coordinator_peer(ctx.crunch_id, ctx.peer_spiffe_ids)
    if not tokens:
        raise AuthError(ErrorCode.TOKEN_MISSING, "call carries no token")
    if len(tokens) > 1:
        raise AuthError(ErrorCode.TOKEN_MALFORMED, "call carries several tokens")
    token = tokens[0]
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError(ErrorCode.TOKEN_TOO_LARGE, f"token is over {MAX_TOKEN_BYTES} bytes")
    message, signature, footer_bytes = paseto.split(token)
    footer = _parse(Footer, footer_bytes, "footer")
    key = registry.coordinator_key(ctx.crunch_id, footer.kid, datetime.fromtimestamp(ctx.now, UTC))
    paseto.check_signature(_verify_key(key.public_key), message, signature, footer_bytes, IMPLICIT_ASSERTION)
    claims = _parse(CallClaims, message, "claims")
    if claims.kid != footer.kid:
        raise AuthError(ErrorCode.TOKEN_MALFORMED, "claims and footer name different keys")
    if claims.crunch != ctx.crunch_id:
        raise AuthError(ErrorCode.TOKEN_WRONG_CRUNCH, f"token is for crunch {claims.crunch!r}")
    if claims.rpc != ctx.rpc:
        raise AuthError(ErrorCode.TOKEN_WRONG_METHOD, f"token is for {claims.rpc!r}, not {ctx.rpc!r}")
    _check_time(claims, ctx, policy)
    split = split_model_id(ctx.body)
    if split is None or claims.bh != sha256_b64url(split[1]):
        raise AuthError(ErrorCode.TOKEN_BODY_MISMATCH, "request body does not match the token")
    if claims.cnf != ctx.peer_cert_sha256:
        raise AuthError(ErrorCode.TOKEN_CERT_MISMATCH, "token was issued for another client certificate")
    return claims, split[0]


def _check_time(claims: CallClaims, ctx: CallContext, policy: TimePolicy) -> None:
    if claims.iat > ctx.now + policy.skew_seconds:
        raise AuthError(ErrorCode.TOKEN_NOT_YET_VALID, "token is issued in the future")
    if ctx.now - policy.skew_seconds >= claims.exp:
        raise AuthError(ErrorCode.TOKEN_EXPIRED, "token has expired")
    if claims.exp - claims.iat > policy.max_lifetime_seconds:
        raise AuthError(ErrorCode.TOKEN_LIFETIME_TOO_LONG, "token lifetime exceeds the verifier's maximum")
    if claims.iat < ctx.started_at:
        raise AuthError(ErrorCode.TOKEN_ISSUED_BEFORE_START, "token was issued before this verifier started")


@functools.lru_cache(maxsize=1024)
def _verify_key(public_key_b64: str) -> VerifyKey:
    """Registered keys are few and reused on every call: decode each once."""
    return VerifyKey(decode_public_key(public_key_b64))


def _parse(model: type[_Parsed], data: bytes, what: str) -> _Parsed:
    """Strict, one-pass parse; the slower look at why runs only for a refusal."""
    try:
        return model.model_validate_json(data)
    except ValidationError:
        pass
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise AuthError(ErrorCode.TOKEN_MALFORMED, f"token {what} is not JSON") from None
    if model is CallClaims and isinstance(obj, dict) and obj.get("v") != 1:
        raise AuthError(ErrorCode.TOKEN_UNSUPPORTED_VERSION, "unknown token claims version")
    raise AuthError(ErrorCode.TOKEN_MALFORMED, f"token {what} do not match the schema")


def verify_delegation(
    token: bytes,
    *,
    registry: Registry,
    crunch_id: str,
    model_id: str,
    presented_spki_sha256: str,
    now: int,
    policy: TimePolicy = TimePolicy(),
) -> DelegationClaims:
    """SMP-30 to SMP-35."""
    if not token:
        raise AuthError(ErrorCode.DELEGATION_MISSING, f"no runner identity delegation for {model_id!r}")
    if len(token) > MAX_DELEGATION_BYTES:
        raise AuthError(ErrorCode.DELEGATION_MALFORMED, "delegation is too large")
    entry = registry.model(crunch_id, model_id)
    if entry is None or not entry.identity_public_key:
        raise AuthError(ErrorCode.MODEL_NOT_REGISTERED, f"model {model_id!r} has no registered cruncher key")
    try:
        message, _ = paseto.verify(_verify_key(entry.identity_public_key), token, DELEGATION_ASSERTION)
    except AuthError as exc:
        code = ErrorCode.DELEGATION_BAD_SIGNATURE if exc.code is ErrorCode.TOKEN_BAD_SIGNATURE else ErrorCode.DELEGATION_MALFORMED
        raise AuthError(code, f"runner delegation: {exc.message}") from None
    try:
        claims = _parse(DelegationClaims, message, "delegation")
    except AuthError as exc:
        raise AuthError(ErrorCode.DELEGATION_MALFORMED, exc.message) from None
    if claims.crunch != crunch_id or claims.model != model_id:
        raise AuthError(ErrorCode.DELEGATION_WRONG_MODEL, f"delegation is for {claims.crunch}/{claims.model}")
    if (
        claims.iat > now + policy.skew_seconds
        or now - policy.skew_seconds >= claims.exp
        or claims.exp - claims.iat > MAX_DELEGATION_LIFETIME
    ):
        raise AuthError(ErrorCode.DELEGATION_EXPIRED, "delegation is not valid now")
    if claims.spki != presented_spki_sha256:
        raise AuthError(ErrorCode.DELEGATION_KEY_MISMATCH, "runner presented a TLS key its cruncher did not delegate")
    return claims
