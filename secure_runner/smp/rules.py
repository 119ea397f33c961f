"""The Secure Model Protocol's call rules, in the order a runner checks them.

Pure and I/O-free: callers pass in the token, the raw request bytes, what they
know about the connection and the clock. Each rule raises `AuthError` with its
own stable code; SECURITY.md lists the test that proves each one.

  SMP-1  The peer's certificate names a coordinator of this runner's crunch
         (exactly one SPIFFE id, role `coordinator`).          PEER_UNAUTHENTICATED
  SMP-2  Exactly one token is present.                         TOKEN_MISSING, TOKEN_MALFORMED
  SMP-3  The token is at most MAX_TOKEN_BYTES.                  TOKEN_TOO_LARGE
  SMP-4  It is a PASETO v4.public token with a {"kid"} footer.  TOKEN_UNSUPPORTED_VERSION,
                                                                TOKEN_MALFORMED
  SMP-5  The key id is registered for this crunch, not revoked
         and inside its validity window.                        KEY_UNKNOWN, KEY_REVOKED,
                                                                KEY_NOT_VALID_NOW
  SMP-6  The signature verifies with that key under this
         protocol's implicit assertion.                         TOKEN_BAD_SIGNATURE
  SMP-7  The claims parse strictly (version 1, all fields,
         nothing extra) and name the same key id.               TOKEN_MALFORMED,
                                                                TOKEN_UNSUPPORTED_VERSION
  SMP-8  The claims name this crunch.                           TOKEN_WRONG_CRUNCH
  SMP-9  The claims name the gRPC method being called.          TOKEN_WRONG_METHOD
  SMP-10 iat <= now + skew; now - skew < exp;
         exp - iat <= max lifetime.                             TOKEN_NOT_YET_VALID,
                                                                TOKEN_EXPIRED,
                                                                TOKEN_LIFETIME_TOO_LONG
  SMP-11 SHA-256 of the raw request bytes equals the claim.     TOKEN_BODY_MISMATCH
  SMP-12 SHA-256 of the peer's certificate equals the claim.    TOKEN_CERT_MISMATCH
  -- the request is parsed only after SMP-1..12 pass --
  SMP-13 The request's model id is the claimed audience and
         its model method the claimed method.                   TOKEN_WRONG_AUDIENCE,
                                                                TOKEN_WRONG_METHOD

The orchestrator's rule for watching a crunch's model list:

  SMP-20 The peer's certificate names a coordinator of this crunch
         (as SMP-1), the crunch asked for is this one, and the
         key id in its SPIFFE id is registered, not revoked and
         valid now (as SMP-5).                                  PEER_UNAUTHENTICATED,
                                                                WATCHER_NOT_AUTHORIZED,
                                                                KEY_UNKNOWN, KEY_REVOKED,
                                                                KEY_NOT_VALID_NOW
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar
from datetime import UTC, datetime

from nacl.signing import VerifyKey
from pydantic import ValidationError

from secure_runner.errors import AuthError, ErrorCode
from secure_runner.smp import paseto
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.registry import Registry
from secure_runner.smp.token import IMPLICIT_ASSERTION, MAX_TOKEN_BYTES, CallClaims, Footer, sha256_b64url

_Parsed = TypeVar("_Parsed", Footer, CallClaims)


@dataclass(frozen=True)
class TimePolicy:
    skew_seconds: int = 5
    max_lifetime_seconds: int = 60


@dataclass(frozen=True)
class CallContext:
    """What the runner knows about one incoming call before parsing it."""

    crunch_id: str
    rpc: str
    peer_spiffe_ids: tuple[str, ...]
    peer_cert_sha256: str
    body: bytes
    now: int


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


def verify_call(
    tokens: Sequence[bytes], ctx: CallContext, registry: Registry, policy: TimePolicy = TimePolicy()
) -> CallClaims:
    """SMP-1 to SMP-12: everything that can be checked on raw bytes."""
    authorize_coordinator_peer(ctx.crunch_id, ctx.peer_spiffe_ids)
    if not tokens:
        raise AuthError(ErrorCode.TOKEN_MISSING, "call carries no token")
    if len(tokens) > 1:
        raise AuthError(ErrorCode.TOKEN_MALFORMED, "call carries several tokens")
    token = tokens[0]
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError(ErrorCode.TOKEN_TOO_LARGE, f"token is over {MAX_TOKEN_BYTES} bytes")
    _, _, footer_bytes = paseto.split(token)
    footer = _parse(Footer, footer_bytes, "footer")
    key = registry.coordinator_key(ctx.crunch_id, footer.kid, datetime.fromtimestamp(ctx.now, UTC))
    message, _ = paseto.verify(VerifyKey(key.public_key_bytes), token, IMPLICIT_ASSERTION)
    claims = _parse(CallClaims, message, "claims")
    if claims.kid != footer.kid:
        raise AuthError(ErrorCode.TOKEN_MALFORMED, "claims and footer name different keys")
    if claims.crunch != ctx.crunch_id:
        raise AuthError(ErrorCode.TOKEN_WRONG_CRUNCH, f"token is for crunch {claims.crunch!r}")
    if claims.rpc != ctx.rpc:
        raise AuthError(ErrorCode.TOKEN_WRONG_METHOD, f"token is for {claims.rpc!r}, not {ctx.rpc!r}")
    _check_time(claims, ctx.now, policy)
    if claims.bh != sha256_b64url(ctx.body):
        raise AuthError(ErrorCode.TOKEN_BODY_MISMATCH, "request body does not match the token")
    if claims.cnf != ctx.peer_cert_sha256:
        raise AuthError(ErrorCode.TOKEN_CERT_MISMATCH, "token was issued for another client certificate")
    return claims


def check_request_target(claims: CallClaims, model_id: str, method: str) -> None:
    """SMP-13, on the parsed request."""
    if claims.aud != model_id:
        raise AuthError(ErrorCode.TOKEN_WRONG_AUDIENCE, f"token is for model {claims.aud!r}")
    if claims.method != method:
        raise AuthError(ErrorCode.TOKEN_WRONG_METHOD, f"token is for model method {claims.method!r}")


def _check_time(claims: CallClaims, now: int, policy: TimePolicy) -> None:
    if claims.iat > now + policy.skew_seconds:
        raise AuthError(ErrorCode.TOKEN_NOT_YET_VALID, "token is issued in the future")
    if now - policy.skew_seconds >= claims.exp:
        raise AuthError(ErrorCode.TOKEN_EXPIRED, "token has expired")
    if claims.exp - claims.iat > policy.max_lifetime_seconds:
        raise AuthError(ErrorCode.TOKEN_LIFETIME_TOO_LONG, "token lifetime exceeds the runner's maximum")


def _parse(model: type[_Parsed], data: bytes, what: str) -> _Parsed:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise AuthError(ErrorCode.TOKEN_MALFORMED, f"token {what} is not JSON") from None
    if model is CallClaims and isinstance(obj, dict) and obj.get("v") != 1:
        raise AuthError(ErrorCode.TOKEN_UNSUPPORTED_VERSION, "unknown token claims version")
    try:
        return model.model_validate(obj)
    except ValidationError:
        raise AuthError(ErrorCode.TOKEN_MALFORMED, f"token {what} do not match the schema") from None
