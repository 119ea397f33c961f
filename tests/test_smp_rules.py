"""The pure Secure Model Protocol rules, one by one, with exact boundaries."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from secure_runner.errors import AuthError, ErrorCode
from secure_runner.smp import paseto, rules
from secure_runner.smp.registry import CoordinatorKey, CrunchEntry, Registry
from secure_runner.smp.token import IMPLICIT_ASSERTION, issue_call_token, sha256_b64url

CRUNCH = "c1"
KEY = SigningKey(b"\x01" * 32)
KID = "kcoordinator"
PEER = (f"spiffe://{CRUNCH}/coordinator/{KID}",)
CERT = "C" * 43
RPC = "/secure_runner.v1.ModelRunner/Call"
NOW = 1_800_000_000
BODY = b"request bytes"


def registry(**key_fields) -> Registry:
    key = CoordinatorKey(key_id=KID, public_key=base64.b64encode(bytes(KEY.verify_key)).decode(), **key_fields)
    return Registry(crunches={CRUNCH: CrunchEntry(coordinators=[key])})


def token(**overrides) -> bytes:
    fields = dict(
        key_id=KID, crunch_id=CRUNCH, audience="m1", rpc=RPC, method="predict",
        body=BODY, cert_sha256=CERT, now=NOW, lifetime=30,
    )
    fields.update(overrides)
    return issue_call_token(overrides.pop("key", KEY), **{k: v for k, v in fields.items() if k != "key"})


def verify(tok: bytes, *, now: int = NOW, peer=PEER, body=BODY, reg: Registry | None = None):
    ctx = rules.CallContext(CRUNCH, RPC, peer, CERT, body, now)
    return rules.verify_call([tok], ctx, reg or registry())


def code_of(call) -> ErrorCode:
    with pytest.raises(AuthError) as err:
        call()
    return err.value.code


def test_valid_token_passes_and_binds_the_target():
    claims = verify(token())
    assert (claims.aud, claims.method, claims.bh) == ("m1", "predict", sha256_b64url(BODY))
    rules.check_request_target(claims, "m1", "predict")
    assert code_of(lambda: rules.check_request_target(claims, "m2", "predict")) == ErrorCode.TOKEN_WRONG_AUDIENCE
    assert code_of(lambda: rules.check_request_target(claims, "m1", "tick")) == ErrorCode.TOKEN_WRONG_METHOD


@pytest.mark.parametrize(
    ("now", "accepted"),
    [
        (NOW - 5, True),  # issued 5 s in the future: inside the skew
        (NOW - 6, False),  # 6 s: outside
        (NOW + 30 + 4, True),  # expired 4 s ago: inside the skew
        (NOW + 30 + 5, False),  # 5 s ago: expired
    ],
)
def test_time_window_boundaries_are_exact(now, accepted):
    if accepted:
        verify(token(), now=now)
    else:
        expected = ErrorCode.TOKEN_NOT_YET_VALID if now < NOW else ErrorCode.TOKEN_EXPIRED
        assert code_of(lambda: verify(token(), now=now)) == expected


def test_lifetime_cap():
    verify(token(lifetime=60))
    assert code_of(lambda: verify(token(lifetime=61))) == ErrorCode.TOKEN_LIFETIME_TOO_LONG


@pytest.mark.parametrize(
    ("peer", "code"),
    [
        ((), ErrorCode.PEER_UNAUTHENTICATED),
        ((PEER[0], f"spiffe://{CRUNCH}/coordinator/other"), ErrorCode.PEER_UNAUTHENTICATED),
        ((f"spiffe://{CRUNCH}/runner/m1",), ErrorCode.PEER_UNAUTHENTICATED),
        ((f"spiffe://other/coordinator/{KID}",), ErrorCode.PEER_UNAUTHENTICATED),
        (("https://example.com/x",), ErrorCode.PEER_UNAUTHENTICATED),
    ],
    ids=["none", "two-uri-sans", "runner-role", "other-crunch", "not-spiffe"],
)
def test_peer_must_be_one_coordinator_of_this_crunch(peer, code):
    assert code_of(lambda: verify(token(), peer=peer)) == code


def test_registry_key_states():
    now_dt = datetime.fromtimestamp(NOW, UTC)
    assert code_of(lambda: verify(token(), reg=registry(revoked=True))) == ErrorCode.KEY_REVOKED
    expired = registry(not_after=now_dt)
    assert code_of(lambda: verify(token(), reg=expired)) == ErrorCode.KEY_NOT_VALID_NOW
    early = registry(not_before=now_dt + timedelta(seconds=1))
    assert code_of(lambda: verify(token(), reg=early)) == ErrorCode.KEY_NOT_VALID_NOW
    empty = Registry(crunches={CRUNCH: CrunchEntry()})
    assert code_of(lambda: verify(token(), reg=empty)) == ErrorCode.KEY_UNKNOWN


def _resign(claims: dict, footer: bytes = b'{"kid":"kcoordinator"}') -> bytes:
    return paseto.sign(KEY, json.dumps(claims).encode(), footer, IMPLICIT_ASSERTION)


def _claims(tok: bytes) -> dict:
    message, _, _ = paseto.split(tok)
    return json.loads(message)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda c: c.update(v=2), ErrorCode.TOKEN_UNSUPPORTED_VERSION),
        (lambda c: c.update(extra="x"), ErrorCode.TOKEN_MALFORMED),
        (lambda c: c.pop("nonce"), ErrorCode.TOKEN_MALFORMED),
        (lambda c: c.update(iat="1800000000"), ErrorCode.TOKEN_MALFORMED),
        (lambda c: c.update(kid="kother"), ErrorCode.TOKEN_MALFORMED),
    ],
    ids=["version-2", "extra-claim", "missing-nonce", "string-iat", "kid-mismatch"],
)
def test_claims_are_parsed_strictly(change, code):
    claims = _claims(token())
    change(claims)
    assert code_of(lambda: verify(_resign(claims))) == code


def test_footer_must_name_a_key():
    assert code_of(lambda: verify(_resign(_claims(token()), b'{"key":"x"}'))) == ErrorCode.TOKEN_MALFORMED
    assert code_of(lambda: verify(_resign(_claims(token()), b"not json"))) == ErrorCode.TOKEN_MALFORMED


def test_a_signature_for_another_purpose_never_verifies():
    # Same key, same claims, but signed without this protocol's implicit assertion.
    forged = paseto.sign(KEY, json.dumps(_claims(token())).encode(), b'{"kid":"kcoordinator"}')
    assert code_of(lambda: verify(forged)) == ErrorCode.TOKEN_BAD_SIGNATURE


def test_watcher_rule():
    reg = registry()
    assert rules.authorize_watcher(CRUNCH, CRUNCH, PEER, reg, NOW).ident == KID
    assert code_of(lambda: rules.authorize_watcher(CRUNCH, "other", PEER, reg, NOW)) == ErrorCode.WATCHER_NOT_AUTHORIZED
    revoked = registry(revoked=True)
    assert code_of(lambda: rules.authorize_watcher(CRUNCH, CRUNCH, PEER, revoked, NOW)) == ErrorCode.KEY_REVOKED
    unregistered = (f"spiffe://{CRUNCH}/coordinator/kunknown",)
    assert code_of(lambda: rules.authorize_watcher(CRUNCH, CRUNCH, unregistered, reg, NOW)) == ErrorCode.KEY_UNKNOWN


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.text(max_size=600).map(str.encode)).map(lambda b: b"v4.public." + b if b[:1] != b"v" else b))
def test_fuzzed_tokens_only_raise_typed_errors(data):
    with pytest.raises(AuthError):
        verify(data)


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=len(token()) - 1), st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_is_refused(position, flip):
    tok = bytearray(token())
    tok[position] ^= flip
    with pytest.raises(AuthError):
        verify(bytes(tok))
