"""PASETO v4.public: Ed25519 signatures over pre-authentication encoding (PAE).

Composed from libsodium's Ed25519 (PyNaCl), no primitive written here. Checked
against the format's official test vectors (tests/test_paseto.py). Only the
`v4.public` purpose exists: the header is compared as bytes before anything
else is decoded, so no other version or purpose is ever interpreted.

    token = "v4.public." + b64url(message || signature) [ "." + b64url(footer) ]
    signature = Ed25519(PAE("v4.public.", message, footer, implicit_assertion))
"""

from __future__ import annotations

import base64
import binascii
import struct

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from secure_runner.errors import AuthError, ErrorCode

HEADER = b"v4.public."
SIGNATURE_BYTES = 64


def pae(*pieces: bytes) -> bytes:
    """Pre-authentication encoding: unambiguous concatenation of byte strings."""
    out = [struct.pack("<Q", len(pieces))]
    for piece in pieces:
        out.append(struct.pack("<Q", len(piece)))
        out.append(piece)
    return b"".join(out)


def _b64encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64decode(data: bytes) -> bytes:
    # Strict: only the URL-safe alphabet, no padding, canonical trailing bits.
    if b"=" in data or len(data) % 4 == 1:
        raise ValueError("bad base64url length or padding")
    raw = base64.b64decode(data + b"=" * (-len(data) % 4), altchars=b"-_", validate=True)
    if _b64encode(raw) != data:
        raise ValueError("non-canonical base64url")
    return raw


def sign(key: SigningKey, message: bytes, footer: bytes = b"", implicit: bytes = b"") -> bytes:
    signature = key.sign(pae(HEADER, message, footer, implicit)).signature
    token = HEADER + _b64encode(message + signature)
    return token + b"." + _b64encode(footer) if footer else token


def split(token: bytes) -> tuple[bytes, bytes, bytes]:
    """Decode a token into (message, signature, footer) without verifying it.

    The footer is readable before verification so a key id in it can pick the
    key; nothing else from an unverified token may be trusted.
    """
    if not token.startswith(HEADER):
        raise AuthError(ErrorCode.TOKEN_UNSUPPORTED_VERSION, "token is not PASETO v4.public")
    parts = token[len(HEADER):].split(b".")
    if len(parts) not in (1, 2):
        raise AuthError(ErrorCode.TOKEN_MALFORMED, "token has too many segments")
    try:
        body = _b64decode(parts[0])
        footer = _b64decode(parts[1]) if len(parts) == 2 else b""
    except (ValueError, binascii.Error):
        raise AuthError(ErrorCode.TOKEN_MALFORMED, "token is not valid base64url") from None
    if len(body) < SIGNATURE_BYTES or (len(parts) == 2 and not footer):
        raise AuthError(ErrorCode.TOKEN_MALFORMED, "token is too short or has an empty footer")
    return body[:-SIGNATURE_BYTES], body[-SIGNATURE_BYTES:], footer


def verify(key: VerifyKey, token: bytes, implicit: bytes = b"") -> tuple[bytes, bytes]:
    """Return (message, footer) if the signature is valid for `key`."""
    message, signature, footer = split(token)
    check_signature(key, message, signature, footer, implicit)
    return message, footer


def check_signature(key: VerifyKey, message: bytes, signature: bytes, footer: bytes, implicit: bytes = b"") -> None:
    """`verify` for a token already `split` (its footer read to pick the key): decoded once, not twice."""
    try:
        key.verify(pae(HEADER, message, footer, implicit), signature)
    except BadSignatureError:
        raise AuthError(ErrorCode.TOKEN_BAD_SIGNATURE, "token signature is invalid") from None
