"""Call tokens: what a coordinator signs for every request to a runner.

A call token is a PASETO v4.public token whose implicit assertion names this
protocol (so a signature made for anything else never verifies here) and whose
footer carries the signing key id (so the verifier can pick the key). The
claims bind the token to one crunch, one model, one gRPC method, the exact
request bytes and the caller's TLS certificate, for a short time window.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Literal

from nacl.signing import SigningKey
from pydantic import BaseModel, ConfigDict, Field

from secure_runner.smp import paseto

TOKEN_VERSION = 1
IMPLICIT_ASSERTION = b"secure-runner call token v1"
# Sizes a real token never exceeds; the runner refuses bigger ones before decoding.
MAX_TOKEN_BYTES = 2048
NONCE_BYTES = 16


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

    v: Literal[1]
    crunch: str = Field(max_length=63, description="crunch id")
    kid: str = Field(max_length=64, description="signing key id, equal to the footer's")
    aud: str = Field(max_length=63, description="model id the call is for")
    rpc: str = Field(max_length=128, description="full gRPC method, /package.Service/Method")
    method: str = Field(max_length=128, description="model method for Call, empty otherwise")
    bh: str = Field(min_length=43, max_length=43, description="SHA-256 of the request bytes")
    cnf: str = Field(min_length=43, max_length=43, description="SHA-256 of the caller's DER certificate")
    iat: int = Field(ge=0, description="issued at, unix seconds")
    exp: int = Field(ge=0, description="expires at, unix seconds")
    nonce: str = Field(min_length=22, max_length=22, description="128 random bits")


def issue_call_token(
    key: SigningKey,
    *,
    key_id: str,
    crunch_id: str,
    audience: str,
    rpc: str,
    method: str,
    body: bytes,
    cert_sha256: str,
    now: int,
    lifetime: int = 30,
) -> bytes:
    """Sign a token for one request whose serialized bytes are `body`."""
    claims = CallClaims(
        v=TOKEN_VERSION,
        crunch=crunch_id,
        kid=key_id,
        aud=audience,
        rpc=rpc,
        method=method,
        bh=sha256_b64url(body),
        cnf=cert_sha256,
        iat=now,
        exp=now + lifetime,
        nonce=b64url(os.urandom(NONCE_BYTES)),
    )
    message = claims.model_dump_json().encode()
    footer = json.dumps({"kid": key_id}, separators=(",", ":")).encode()
    return paseto.sign(key, message, footer, IMPLICIT_ASSERTION)
