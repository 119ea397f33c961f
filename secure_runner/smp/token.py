"""Call tokens: what a coordinator signs for its requests.

A call token is a PASETO v4.public token whose implicit assertion names this
protocol (so a signature made for anything else never verifies here) and whose
footer carries the signing key id (so the verifier can pick the key). The
claims bind the token to one crunch, a set of models (the audience), the
servers that may accept it (`dst`: each one's TLS key), one gRPC method and
model method, the exact request bytes and the caller's TLS certificate, for a
short time window.

Destinations: a server is named by the SHA-256 of the SubjectPublicKeyInfo it
presents in TLS (for a runner, the key its cruncher's delegation binds, which
the client checked before sending anything). Two runners hosting the same model
id never share it, so a token captured on one runner is refused by another,
and a FanOut token for one node by every other node. One token may name a
bounded set (`MAX_DESTINATIONS`) when one signature covers calls to several
runners.

What is signed of the request: every request message starts with its model id
(field 1). A request's bytes are `model_id_field(model_id) + shared`, and `bh`
is the SHA-256 of `shared`. So one token signed per fan-out covers the same
call to every model in its audience, while each request still names exactly
one model, which must be in the audience.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Annotated, Literal

from nacl.signing import SigningKey
from pydantic import BaseModel, ConfigDict, Field

from secure_runner.smp import paseto

TOKEN_VERSION = 2  # 2: adds `dst`; a version 1 token is TOKEN_UNSUPPORTED_VERSION
IMPLICIT_ASSERTION = b"secure-runner call token v1"
# Sizes a real token never exceeds; the runner refuses bigger ones before decoding.
MAX_AUDIENCE = 64
MAX_DESTINATIONS = 32  # with MAX_AUDIENCE long model ids, still under MAX_TOKEN_BYTES
MAX_TOKEN_BYTES = 8192
NONCE_BYTES = 16
MAX_MODEL_ID_BYTES = 63
_MODEL_ID_TAG = 0x0A  # field 1, wire type 2 (length-delimited)


def model_id_field(model_id: str) -> bytes:
    """The leading bytes of a request for `model_id`: its field 1, encoded."""
    raw = model_id.encode()
    if len(raw) > MAX_MODEL_ID_BYTES:
        raise ValueError("model id too long")
    return bytes((_MODEL_ID_TAG, len(raw))) + raw


def split_model_id(body: bytes) -> tuple[str, bytes] | None:
    """(model id, shared bytes) of a request in the signed form, or None if it is not."""
    if len(body) < 2 or body[0] != _MODEL_ID_TAG or body[1] > MAX_MODEL_ID_BYTES:
        return None
    end = 2 + body[1]
    try:
        model_id = body[2:end].decode()
    except UnicodeDecodeError:
        return None
    return (model_id, body[end:]) if len(model_id) == body[1] else None


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sha256_b64url(data: bytes) -> str:
    return b64url(hashlib.sha256(data).digest())


class Footer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    kid: str = Field(max_length=64)


class CallClaims(BaseModel):
    """The signed claims. Field names are short because they travel on every call."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[2]
    crunch: str = Field(max_length=63, description="crunch id")
    kid: str = Field(max_length=64, description="signing key id, equal to the footer's")
    aud: list[Annotated[str, Field(max_length=MAX_MODEL_ID_BYTES)]] = Field(
        min_length=1, max_length=MAX_AUDIENCE, description="model ids the call may go to"
    )
    dst: list[Annotated[str, Field(min_length=43, max_length=43)]] = Field(
        min_length=1, max_length=MAX_DESTINATIONS, description="SHA-256 of each accepting server's TLS public key"
    )
    rpc: str = Field(max_length=128, description="full gRPC method, /package.Service/Method")
    method: str = Field(max_length=128, description="model method for Call, empty otherwise")
    bh: str = Field(min_length=43, max_length=43, description="SHA-256 of the request bytes after the model id")
    cnf: str = Field(min_length=43, max_length=43, description="SHA-256 of the caller's DER certificate")
    iat: int = Field(ge=0, description="issued at, unix seconds")
    exp: int = Field(ge=0, description="expires at, unix seconds")
    nonce: str = Field(min_length=22, max_length=22, description="128 random bits")


def issue_call_token(
    key: SigningKey,
    *,
    key_id: str,
    crunch_id: str,
    audience: Sequence[str],
    destinations: Sequence[str],
    rpc: str,
    method: str,
    shared_body: bytes,
    cert_sha256: str,
    now: int,
    lifetime: int = 30,
) -> bytes:
    """Sign a token for requests `model_id_field(m) + shared_body`, for each m in `audience`, to `destinations`."""
    claims = CallClaims(
        v=TOKEN_VERSION,
        crunch=crunch_id,
        kid=key_id,
        aud=list(audience),
        dst=list(destinations),
        rpc=rpc,
        method=method,
        bh=sha256_b64url(shared_body),
        cnf=cert_sha256,
        iat=now,
        exp=now + lifetime,
        nonce=b64url(os.urandom(NONCE_BYTES)),
    )
    message = claims.model_dump_json().encode()
    return paseto.sign(key, message, _footer(key_id), IMPLICIT_ASSERTION)


@functools.lru_cache(maxsize=16)
def _footer(key_id: str) -> bytes:
    """The footer naming `key_id`: a signer has one key id, so it is encoded once, not per call."""
    return json.dumps({"kid": key_id}, separators=(",", ":")).encode()


# -- runner identity delegation -------------------------------------------------------

DELEGATION_ASSERTION = b"secure-runner runner delegation v1"
MAX_DELEGATION_BYTES = 2048
MAX_DELEGATION_LIFETIME = 31 * 24 * 3600


class DelegationClaims(BaseModel):
    """A cruncher's statement: this TLS key may serve my model until `exp`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1]
    crunch: str = Field(max_length=63)
    model: str = Field(max_length=MAX_MODEL_ID_BYTES)
    spki: str = Field(min_length=43, max_length=43, description="SHA-256 of the runner's SubjectPublicKeyInfo")
    iat: int = Field(ge=0)
    exp: int = Field(ge=0)


def issue_delegation(
    cruncher_key: SigningKey, *, crunch_id: str, model_id: str, spki_sha256: str, now: int, lifetime: int
) -> bytes:
    """Signed by the cruncher's identity key (registered for the model), never by the orchestrator."""
    claims = DelegationClaims(v=1, crunch=crunch_id, model=model_id, spki=spki_sha256, iat=now, exp=now + lifetime)
    return paseto.sign(cruncher_key, claims.model_dump_json().encode(), b"", DELEGATION_ASSERTION)
