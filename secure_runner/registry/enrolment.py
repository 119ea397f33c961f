"""The reference's enrolment message, accepted as a runner delegation (pure, no I/O).

Crunchers who enrolled with the reference's tooling hold a file
`{"message_b64", "wallet_pubkey_b58", "signature_b64"}` whose message is the UTF-8 JSON
`{"cert_pub": <base64 DER SubjectPublicKeyInfo>, "hotkey": <base58>, "model_id": <string>}`
and whose signature is the Solana wallet's Ed25519 signature over exactly those bytes
(checked against real signed files of crunchdao/model-runner `tests/certs/`, kept as test
vectors in tests/vectors/reference_enrolment/; the reference compares `cert_pub` with the TLS
key's DER SPKI, and `hotkey` / `model_id` with the values it was configured with).

It is verified like our delegation (SMP-30..35): it must bind the TLS key the runner
presents to this model, signed by the wallet the registry holds for the model. The rules,
in order (SECURITY.md, EN-1..EN-7):

  EN-1 Present, at most 4 KiB, the reference's envelope: exactly its three string members,
       none repeated, canonical base64, a 32-byte wallet and a
       64-byte signature.                                         DELEGATION_MISSING,
                                                                  DELEGATION_MALFORMED
  EN-2 The model is in a fresh registry with a cruncher key.      REGISTRY_STALE,
                                                                  MODEL_NOT_REGISTERED
  EN-3 The envelope names that key as its wallet, and the
       signature over the exact message bytes verifies with it.   DELEGATION_BAD_SIGNATURE
  EN-4 Only now is the message parsed: a UTF-8 JSON object with
       exactly `cert_pub`, `hotkey`, `model_id`, strings, none
       repeated (the older forms without hotkey or model id are
       refused: they do not name a model).                        DELEGATION_MALFORMED
  EN-5 `model_id` is this model.                                  DELEGATION_WRONG_MODEL
  EN-6 `hotkey` is the hotkey the chain registers for the wallet. DELEGATION_WRONG_HOTKEY
  EN-7 `cert_pub` is the SubjectPublicKeyInfo the runner
       presented (compared by SHA-256).                           DELEGATION_KEY_MISMATCH

What the reference form lacks, and ours has: an expiry (it stays valid while the wallet and
hotkey stay registered for the model: revoke by changing the hotkey on chain) and a crunch
id (it is valid in every crunch where the same wallet registers the same model id). One
public version of the reference's signing tool (crunchdao/crunch-certificate) names the member
`hot_key`; such messages are refused under EN-4 (only the form above was seen signed and used).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from secure_runner.errors import AuthError, ErrorCode
from secure_runner.registry.solana_accounts import pubkey_bytes
from secure_runner.smp.registry import RegistrySnapshot, decode_public_key
from secure_runner.smp.rules import TimePolicy, current_registry
from secure_runner.smp.token import sha256_b64url

MAX_ENROLMENT_BYTES = 4096
ENVELOPE_MEMBERS = frozenset({"message_b64", "wallet_pubkey_b58", "signature_b64"})
MESSAGE_MEMBERS = frozenset({"cert_pub", "hotkey", "model_id"})
SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class EnrolmentClaims:
    """What a verified reference enrolment states."""

    model_id: str
    hotkey: bytes
    cert_pub: bytes  # the runner's TLS SubjectPublicKeyInfo, DER


def _malformed(reason: str) -> AuthError:
    return AuthError(ErrorCode.DELEGATION_MALFORMED, f"reference enrolment: {reason}")


def _strict_object(data: bytes, members: frozenset[str], what: str) -> dict[str, str]:
    """A JSON object with exactly `members`, all strings, none repeated."""
    def no_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError("repeated member")
        return dict(pairs)

    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=no_repeats)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _malformed(f"{what} is not UTF-8 JSON without repeated members") from None
    if not isinstance(obj, dict) or set(obj) != members or not all(isinstance(v, str) for v in obj.values()):
        raise _malformed(f"{what} must hold exactly {', '.join(sorted(members))}, as strings")
    return obj


def _b64(value: str, what: str) -> bytes:
    """Canonical base64 only: unused low bits must be zero, so one value has one spelling."""
    try:
        decoded = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _malformed(f"{what} is not base64") from None
    if base64.b64encode(decoded).decode() != value:
        raise _malformed(f"{what} is not canonical base64")
    return decoded


def verify_reference_enrolment(
    envelope: bytes,
    *,
    registry: RegistrySnapshot,
    hotkeys: Mapping[bytes, bytes] | None = None,
    crunch_id: str,
    model_id: str,
    presented_spki_sha256: str,
    now: int,
    policy: TimePolicy = TimePolicy(),
) -> EnrolmentClaims:
    """EN-1 to EN-7. `hotkeys` maps wallets to their registered hotkeys (`ChainFacts.hotkeys`); without it,
    the model entry's `hotkey` is the registered one."""
    if not envelope:  # EN-1
        raise AuthError(ErrorCode.DELEGATION_MISSING, f"no runner identity delegation for {model_id!r}")
    if len(envelope) > MAX_ENROLMENT_BYTES:
        raise _malformed("too large")
    fields = _strict_object(envelope, ENVELOPE_MEMBERS, "the envelope")
    message, signature = _b64(fields["message_b64"], "message_b64"), _b64(fields["signature_b64"], "signature_b64")
    try:
        wallet = pubkey_bytes(fields["wallet_pubkey_b58"])
    except ValueError:
        raise _malformed("wallet_pubkey_b58 is not a base58 public key") from None
    if len(signature) != SIGNATURE_BYTES:
        raise _malformed(f"the signature is not {SIGNATURE_BYTES} bytes")

    entry = current_registry(registry, now, policy).model(crunch_id, model_id)  # EN-2
    if entry is None or not entry.identity_public_key:
        raise AuthError(ErrorCode.MODEL_NOT_REGISTERED, f"model {model_id!r} has no registered cruncher key")
    if wallet != decode_public_key(entry.identity_public_key):  # EN-3
        raise AuthError(ErrorCode.DELEGATION_BAD_SIGNATURE, "reference enrolment names another wallet than the model's")
    try:
        VerifyKey(wallet).verify(message, signature)
    except BadSignatureError:
        raise AuthError(ErrorCode.DELEGATION_BAD_SIGNATURE, "reference enrolment signature does not verify") from None

    claims = _strict_object(message, MESSAGE_MEMBERS, "the signed message")  # EN-4
    if claims["model_id"] != model_id:  # EN-5
        raise AuthError(ErrorCode.DELEGATION_WRONG_MODEL, f"reference enrolment is for model {claims['model_id'][:64]!r}")
    try:
        hotkey = pubkey_bytes(claims["hotkey"])
    except ValueError:
        raise _malformed("hotkey is not a base58 public key") from None
    registered = hotkeys.get(wallet) if hotkeys is not None else (
        decode_public_key(entry.hotkey) if entry.hotkey else None)
    if registered != hotkey:  # EN-6
        raise AuthError(ErrorCode.DELEGATION_WRONG_HOTKEY, "reference enrolment names a hotkey the chain does not register")
    cert_pub = _b64(claims["cert_pub"], "cert_pub")
    if sha256_b64url(cert_pub) != presented_spki_sha256:  # EN-7
        raise AuthError(ErrorCode.DELEGATION_KEY_MISMATCH, "runner presented a TLS key its cruncher did not enrol")
    return EnrolmentClaims(model_id=model_id, hotkey=hotkey, cert_pub=cert_pub)
