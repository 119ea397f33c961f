"""The Secure Model Protocol's call rules, in the order they are checked.

Pure and I/O-free: callers pass in the token, the raw request bytes, what they
know about the connection, the registry, the replay cache and the clock. Each
rule raises `AuthError` (or `RequestError` for an unparsable request) with its
own stable code; SECURITY.md lists the test that proves each one.

Every token-protected call goes through `authorize_call`. Each service says which
role a method accepts (`CallContext.role`): the coordinator for runner Setup /
Call / FanOut / Reset and orchestrator WatchModels / ReportFailure; the operator
for the orchestrator's operator RPCs. Coordinator and operator keys are
registered in separate sections of a crunch's registry entry (`coordinators`,
`operators`), and a certificate of one role never passes for the other.

  SMP-1  The peer's certificate carries exactly one SPIFFE id and it names
         the accepted role in this crunch.                      PEER_UNAUTHENTICATED
  SMP-2  Exactly one token is present.                          TOKEN_MISSING, TOKEN_MALFORMED
  SMP-3  The token is at most MAX_TOKEN_BYTES.                  TOKEN_TOO_LARGE
  SMP-4  It is a PASETO v4.public token with a {"kid"} footer
         (no JSON member repeated).                             TOKEN_UNSUPPORTED_VERSION,
                                                                TOKEN_MALFORMED
  SMP-4a The footer's key id is the key id the peer's
         certificate names (spiffe://<crunch>/<role>/<key-id>):
         a certificate works only with its own signing key.     TOKEN_KID_MISMATCH
  SMP-4b The registry snapshot was fetched at most
         max_registry_age_seconds ago.                          REGISTRY_STALE
  SMP-5  The key id is registered for this crunch and role,
         not revoked and inside its validity window.            KEY_UNKNOWN, KEY_REVOKED,
                                                                KEY_NOT_VALID_NOW
  SMP-5a When the registry names the TLS keys enrolled for that
         key (the chain's certificate slots), SHA-256 of the
         peer certificate's SubjectPublicKeyInfo is one of them. COORDINATOR_CERT_NOT_ENROLLED
  SMP-6  The signature verifies with that key under this
         protocol's implicit assertion.                         TOKEN_BAD_SIGNATURE
  SMP-7  The claims parse strictly (version 2, all fields,
         nothing extra, no member repeated) and name the
         footer's key id.                                       TOKEN_UNSUPPORTED_VERSION,
                                                                TOKEN_MALFORMED
  SMP-8  The claims name this crunch.                           TOKEN_WRONG_CRUNCH
  SMP-9  The claims name the gRPC method being called.          TOKEN_WRONG_METHOD
  SMP-9a The claims' destinations (`dst`) include this server
         (SHA-256 of the TLS public key it serves).             TOKEN_WRONG_DESTINATION
  SMP-10 iat <= now (no skew: see below); now - skew < exp;
         exp - iat <= max lifetime; iat >= the verifier's
         start second (its replay cache was empty before).      TOKEN_NOT_YET_VALID,
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

Why `iat` gets no skew: a restart empties the replay cache, so the verifier refuses
tokens issued before its start second. A token it accepted before restarting had
`iat <= ` that acceptance's second `<=` the new start second; with no future
tolerance on `iat`, the only token that can be accepted again is one accepted in
the very second of the restart. (A skew on `iat` would stretch that to skew + 1
seconds.) Clients date their tokens a quarter second back to absorb sub-second
clock offsets; a coordinator clock running ahead by more is refused.

Watching a crunch's model list (orchestrator WatchModels): the stream is opened
by a call token (SMP-1..14 with the crunch id as the request's subject and
audience); while it stays open `authorize_watcher` re-checks the watcher:

  SMP-20 As SMP-1, the crunch asked for is this one, and the key
         id in the peer's SPIFFE id passes SMP-4b, SMP-5 and
         SMP-5a (its TLS key still enrolled).                   PEER_UNAUTHENTICATED,
                                                                WATCHER_NOT_AUTHORIZED,
                                                                REGISTRY_STALE, KEY_*

Health checks (runner and orchestrator), before the request is parsed:

  SMP-21 The peer's certificate carries exactly one SPIFFE id
         naming one of the allowed roles in this crunch.        PEER_UNAUTHENTICATED

Request subjects: every token-protected request starts with field 1, its subject:
a model id (its audience is that model), a node id with `model_ids` (a FanOut or
an operator's node request: its audience is those models), or a crunch id (a
crunch-wide request such as WatchModels or an operator's listing: its audience is
the crunch id itself).

A runner's identity, checked by the client before it sends any request
(`verify_delegation`; the TLS handshake has already pinned the runner's name
to the crunch CA):

  SMP-30 A delegation is present and at most MAX_DELEGATION_BYTES. DELEGATION_MISSING,
                                                                DELEGATION_MALFORMED
  SMP-31 The model is in the registry with a cruncher identity
         key (the registry's word, never the orchestrator's),
         from a registry fetched within max_registry_age_seconds. MODEL_NOT_REGISTERED,
                                                                REGISTRY_STALE
  SMP-32 The delegation is signed by that key (PASETO v4.public,
         implicit assertion `secure-runner runner delegation v1`). DELEGATION_BAD_SIGNATURE,
                                                                DELEGATION_MALFORMED
  SMP-33 Its claims parse strictly (no member repeated) and
         name this crunch and model.                            DELEGATION_MALFORMED,
                                                                DELEGATION_WRONG_MODEL
  SMP-34 iat <= now + skew, now - skew < exp and
         exp - iat <= 31 days.                                  DELEGATION_EXPIRED
  SMP-35 It binds the TLS key the runner actually presented
         (SHA-256 of its SubjectPublicKeyInfo).                 DELEGATION_KEY_MISMATCH
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from nacl.signing import VerifyKey
from pydantic import ValidationError

from secure_runner.errors import AuthError, ErrorCode
from secure_runner.smp import paseto
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.registry import CoordinatorKey, Registry, RegistrySnapshot, decode_public_key
from secure_runner.smp.replay import ReplayCache
from secure_runner.smp.token import (
    DELEGATION_ASSERTION,
    IMPLICIT_ASSERTION,
    MAX_DELEGATION_BYTES,
    MAX_DELEGATION_LIFETIME,
    MAX_TOKEN_BYTES,
    TOKEN_VERSION,
    CallClaims,
    DelegationClaims,
    Footer,
    sha256_b64url,
    split_model_id,
)

_Parsed = TypeVar("_Parsed", Footer, CallClaims, DelegationClaims)


class ModelRequest(Protocol):
    """A request whose field 1 is its subject: `model_id`, `node_id` (with `model_ids`) or `crunch_id`."""


def subject_and_targets(request: ModelRequest) -> tuple[str, list[str]]:
    """The id in the request's field 1, and what it reaches (its audience must cover all of it)."""
    model_ids = getattr(request, "model_ids", None)
    if model_ids is not None:
        return request.node_id, list(model_ids)
    model_id = getattr(request, "model_id", None)
    if model_id is not None:
        return model_id, [model_id]
    return request.crunch_id, [request.crunch_id]


_Request = TypeVar("_Request", bound=ModelRequest)


@dataclass(frozen=True)
class TimePolicy:
    """The verifier's time limits, in seconds."""

    skew_seconds: int = 5  # tolerated lag of a caller's clock (applies to `exp` only)
    max_lifetime_seconds: int = 60
    max_registry_age_seconds: int = 60  # refuse calls once the registry could not be fetched for this long


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
    destinations: frozenset[str]  # this server's names for `dst`: SHA-256 of the TLS public key(s) it serves
    role: Role = Role.COORDINATOR  # the role this method accepts (coordinator, or operator)
    peer_spki_sha256: bytes = b""  # raw SHA-256 of the peer certificate's SubjectPublicKeyInfo (SMP-5a)


def authorize_peer(crunch_id: str, peer_spiffe_ids: tuple[str, ...], roles: Collection[Role]) -> PeerIdentity:
    """SMP-1 / SMP-21: one SPIFFE id, naming one of `roles` in this crunch."""
    if len(peer_spiffe_ids) != 1:
        raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, "peer certificate must carry exactly one SPIFFE id")
    peer = PeerIdentity.parse(peer_spiffe_ids[0])
    if peer.crunch_id != crunch_id or peer.role not in roles:
        wanted = " or ".join(sorted(roles))
        raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, f"{peer.spiffe_id} is not a {wanted} of {crunch_id}")
    return peer


def authorize_coordinator_peer(crunch_id: str, peer_spiffe_ids: tuple[str, ...]) -> PeerIdentity:
    """SMP-1 for coordinator methods."""
    return authorize_peer(crunch_id, peer_spiffe_ids, (Role.COORDINATOR,))


def current_registry(snapshot: RegistrySnapshot, now: int, policy: TimePolicy) -> Registry:
    """SMP-4b: the snapshot's registry, unless it was fetched longer ago than the policy allows."""
    if now - snapshot.fetched_at > policy.max_registry_age_seconds:
        raise AuthError(
            ErrorCode.REGISTRY_STALE,
            f"the registry could not be refreshed for {now - snapshot.fetched_at} s "
            f"(at most {policy.max_registry_age_seconds} s allowed)",
        )
    return snapshot.registry


def authorize_watcher(
    crunch_id: str,
    requested_crunch_id: str,
    peer_spiffe_ids: tuple[str, ...],
    peer_spki_sha256: bytes,
    registry: RegistrySnapshot,
    now: int,
    policy: TimePolicy = TimePolicy(),
) -> PeerIdentity:
    """SMP-20 (with SMP-5a, so a stream stays open only while its TLS key is enrolled)."""
    peer = authorize_coordinator_peer(crunch_id, peer_spiffe_ids)
    if requested_crunch_id != crunch_id:
        raise AuthError(ErrorCode.WATCHER_NOT_AUTHORIZED, f"this orchestrator serves crunch {crunch_id!r} only")
    key = current_registry(registry, now, policy).coordinator_key(crunch_id, peer.ident, datetime.fromtimestamp(now, UTC))
    check_enrolled_tls_key(key, peer_spki_sha256)
    return peer


def authorize_call(
    tokens: Sequence[bytes],
    ctx: CallContext,
    registry: RegistrySnapshot,
    replay: ReplayCache,
    parse: Callable[[bytes], _Request],
    policy: TimePolicy = TimePolicy(),
    seen: MutableMapping[str, str] | None = None,
) -> tuple[CallClaims, _Request]:
    """SMP-1 to SMP-14, in order. `parse` must raise RequestError(MALFORMED_REQUEST).

    `seen`, if given, receives what the token claims as soon as it is read (`kid`,
    then `models` and `nonce`), so a refusal's audit line can name them.
    """
    claims, prefix_id = verify_token(tokens, ctx, registry, policy, seen)
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
    tokens: Sequence[bytes],
    ctx: CallContext,
    registry: RegistrySnapshot,
    policy: TimePolicy = TimePolicy(),
    seen: MutableMapping[str, str] | None = None,
) -> tuple[CallClaims, str]:
    """SMP-1 to SMP-12: everything checked on raw bytes. Returns the claims and the prefix subject id."""
    peer = authorize_peer(ctx.crunch_id, ctx.peer_spiffe_ids, (ctx.role,))  # SMP-1
    if not tokens:  # SMP-2
        raise AuthError(ErrorCode.TOKEN_MISSING, "call carries no token")
    if len(tokens) > 1:
        raise AuthError(ErrorCode.TOKEN_MALFORMED, "call carries several tokens")
    token = tokens[0]
    if len(token) > MAX_TOKEN_BYTES:  # SMP-3
        raise AuthError(ErrorCode.TOKEN_TOO_LARGE, f"token is over {MAX_TOKEN_BYTES} bytes")
    message, signature, footer_bytes = paseto.split(token)  # SMP-4
    footer = _parse(Footer, footer_bytes, "footer")
    if seen is not None:
        seen["kid"] = footer.kid
    if footer.kid != peer.ident:  # SMP-4a
        raise AuthError(ErrorCode.TOKEN_KID_MISMATCH, f"token is signed by key {footer.kid!r}, not the certificate's")
    now = datetime.fromtimestamp(ctx.now, UTC)
    key = current_registry(registry, ctx.now, policy).signing_key(ctx.role, ctx.crunch_id, footer.kid, now)  # SMP-4b, 5
    check_enrolled_tls_key(key, ctx.peer_spki_sha256)  # SMP-5a
    paseto.check_signature(_verify_key(key.public_key), message, signature, footer_bytes, IMPLICIT_ASSERTION)  # SMP-6
    claims = _parse(CallClaims, message, "claims")  # SMP-7
    if seen is not None:
        seen["models"] = ",".join(claims.aud)[:200]
        seen["nonce"] = claims.nonce
    if claims.kid != footer.kid:
        raise AuthError(ErrorCode.TOKEN_MALFORMED, "claims and footer name different keys")
    if claims.crunch != ctx.crunch_id:  # SMP-8
        raise AuthError(ErrorCode.TOKEN_WRONG_CRUNCH, f"token is for crunch {claims.crunch!r}")
    if claims.rpc != ctx.rpc:  # SMP-9
        raise AuthError(ErrorCode.TOKEN_WRONG_METHOD, f"token is for {claims.rpc!r}, not {ctx.rpc!r}")
    if ctx.destinations.isdisjoint(claims.dst):  # SMP-9a
        raise AuthError(ErrorCode.TOKEN_WRONG_DESTINATION, "token is for other servers")
    _check_time(claims, ctx, policy)  # SMP-10
    split = split_model_id(ctx.body)  # SMP-11
    if split is None or claims.bh != sha256_b64url(split[1]):
        raise AuthError(ErrorCode.TOKEN_BODY_MISMATCH, "request body does not match the token")
    if claims.cnf != ctx.peer_cert_sha256:  # SMP-12
        raise AuthError(ErrorCode.TOKEN_CERT_MISMATCH, "token was issued for another client certificate")
    return claims, split[0]


def check_enrolled_tls_key(key: CoordinatorKey, peer_spki_sha256: bytes) -> None:
    """SMP-5a: where the registry binds TLS keys to the signing key, the peer's must be one of them."""
    if key.enrolled_tls_keys is not None and peer_spki_sha256 not in key.enrolled_tls_keys:
        raise AuthError(
            ErrorCode.COORDINATOR_CERT_NOT_ENROLLED,
            f"the TLS key of {key.key_id!r} is not enrolled for it (in neither of its certificate slots)",
        )


def _check_time(claims: CallClaims, ctx: CallContext, policy: TimePolicy) -> None:
    if claims.iat > ctx.now:
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
    """Strict, one-pass parse; the slower look at why runs only for a refusal.

    A JSON object naming a member twice parses to its last value in pydantic, so
    an accepted parse must also be unambiguous: the canonical serialization (what
    our signers produce) is compared as bytes first, a few microseconds in Rust,
    and only other encodings are re-read to look for a repeated member.
    """
    try:
        parsed = model.model_validate_json(data)
    except ValidationError:
        parsed = None
    if parsed is not None:
        if model.__pydantic_serializer__.to_json(parsed) == data or _members_unique(data):
            return parsed
        raise AuthError(ErrorCode.TOKEN_MALFORMED, f"token {what} repeat a JSON member")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise AuthError(ErrorCode.TOKEN_MALFORMED, f"token {what} is not JSON") from None
    if model is CallClaims and isinstance(obj, dict) and obj.get("v") != TOKEN_VERSION:
        raise AuthError(ErrorCode.TOKEN_UNSUPPORTED_VERSION, "unknown token claims version")
    raise AuthError(ErrorCode.TOKEN_MALFORMED, f"token {what} do not match the schema")


class _RepeatedMember(ValueError):
    pass


def _no_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _RepeatedMember
    return result


def _members_unique(data: bytes) -> bool:
    """True if no JSON object in `data` names a member twice."""
    try:
        json.loads(data, object_pairs_hook=_no_repeats)
    except (ValueError, RecursionError):  # _RepeatedMember, or JSON only pydantic's parser reads
        return False
    return True


def verify_delegation(
    token: bytes,
    *,
    registry: RegistrySnapshot,
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
    entry = current_registry(registry, now, policy).model(crunch_id, model_id)
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
