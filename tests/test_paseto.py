"""PASETO v4.public against the format's official test vectors."""

import base64
import json
from pathlib import Path

import pytest
from nacl.signing import SigningKey, VerifyKey

from secure_runner.errors import AuthError, ErrorCode
from secure_runner.smp import paseto

VECTORS = json.loads((Path(__file__).parent / "vectors" / "paseto_v4_public.json").read_text())["tests"]


def _paserk(value: str, prefix: str) -> bytes:
    assert value.startswith(prefix)
    data = value[len(prefix):]
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_official_vector_signs_and_verifies(vector):
    secret = _paserk(vector["secret-key"], "k4.secret.")
    public = _paserk(vector["public-key"], "k4.public.")
    signing_key = SigningKey(secret[:32])
    assert bytes(signing_key.verify_key) == public == secret[32:]
    message = vector["payload"].encode()
    footer = vector["footer"].encode()
    implicit = vector["implicit-assertion"].encode()

    # Ed25519 is deterministic, so signing must reproduce the vector exactly.
    assert paseto.sign(signing_key, message, footer, implicit).decode() == vector["token"]
    assert paseto.verify(VerifyKey(public), vector["token"].encode(), implicit) == (message, footer)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_official_vector_fails_with_other_implicit_assertion(vector):
    public = _paserk(vector["public-key"], "k4.public.")
    with pytest.raises(AuthError) as err:
        paseto.verify(VerifyKey(public), vector["token"].encode(), b"another assertion")
    assert err.value.code == ErrorCode.TOKEN_BAD_SIGNATURE


def test_other_versions_and_purposes_are_refused():
    token = VECTORS[0]["token"].encode()
    for forged in (token.replace(b"v4.public.", b"v4.local."), token.replace(b"v4.", b"v3.")):
        with pytest.raises(AuthError) as err:
            paseto.split(forged)
        assert err.value.code == ErrorCode.TOKEN_UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    "suffix",
    [b"=", b"..e30", b".", b"!"],
    ids=["padding", "three-segments", "empty-footer", "bad-alphabet"],
)
def test_malformed_encodings_are_refused(suffix):
    with pytest.raises(AuthError) as err:
        paseto.split(VECTORS[0]["token"].encode() + suffix)
    assert err.value.code == ErrorCode.TOKEN_MALFORMED


def test_flipped_signature_bit_is_refused():
    vector = VECTORS[1]
    message, signature, footer = paseto.split(vector["token"].encode())
    tampered = paseto.HEADER + paseto._b64encode(message + bytes([signature[0] ^ 1]) + signature[1:])
    tampered += b"." + paseto._b64encode(footer)
    with pytest.raises(AuthError) as err:
        paseto.verify(VerifyKey(_paserk(vector["public-key"], "k4.public.")), tampered)
    assert err.value.code == ErrorCode.TOKEN_BAD_SIGNATURE
