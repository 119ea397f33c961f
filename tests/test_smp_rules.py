"""The pure Secure Model Protocol rules, one by one, with exact boundaries."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from secure_runner.errors import AuthError, ConfigError, ErrorCode
from secure_runner.smp import paseto, rules
from secure_runner.smp.identity import Role
from secure_runner.smp.registry import CoordinatorKey, CrunchEntry, ModelEntry, Registry, RegistrySnapshot
from secure_runner.smp.replay import ReplayCache
from secure_runner.smp.token import (
    DELEGATION_ASSERTION,
    IMPLICIT_ASSERTION,
    MAX_AUDIENCE,
    MAX_DESTINATIONS,
    MAX_TOKEN_BYTES,
    issue_call_token,
    issue_delegation,
    model_id_field,
    sha256_b64url,
    split_model_id,
)

CRUNCH = "c1"
KEY = SigningKey(b"\x01" * 32)
KID = "kcoordinator"
PEER = (f"spiffe://{CRUNCH}/coordinator/{KID}",)
CERT = "C" * 43
DEST = "D" * 43  # this verifier's TLS key hash: what tokens for it name in `dst`
RPC = "/secure_runner.v1.ModelRunner/Call"
NOW = 1_800_000_000
SHARED = b"request bytes"
BODY = model_id_field("m1") + SHARED


def registered(key_id: str = KID, signing_key: SigningKey = KEY, **key_fields) -> CoordinatorKey:
    return CoordinatorKey(key_id=key_id, public_key=base64.b64encode(bytes(signing_key.verify_key)).decode(), **key_fields)


def registry(**key_fields) -> Registry:
    return Registry(crunches={CRUNCH: CrunchEntry(coordinators=[registered(**key_fields)])})


def snap(reg: Registry, fetched_at: int = NOW) -> RegistrySnapshot:
    return RegistrySnapshot(reg, fetched_at)


def token(**overrides) -> bytes:
    fields = dict(
        key_id=KID, crunch_id=CRUNCH, audience=["m1"], destinations=[DEST], rpc=RPC, method="predict",
        shared_body=SHARED, cert_sha256=CERT, now=NOW, lifetime=30,
    )
    fields.update(overrides)
    return issue_call_token(overrides.pop("key", KEY), **{k: v for k, v in fields.items() if k != "key"})


def verify(
    tok: bytes, *, now: int = NOW, peer=PEER, body=BODY, reg: Registry | None = None, started_at: int = 0,
    role: Role = Role.COORDINATOR, fetched_at: int | None = None, seen: dict | None = None,
):
    ctx = rules.CallContext(CRUNCH, RPC, peer, CERT, body, now, started_at, frozenset({DEST}), role)
    snapshot = snap(reg or registry(), now if fetched_at is None else fetched_at)
    return rules.verify_token([tok], ctx, snapshot, seen=seen)[0]


def code_of(call) -> ErrorCode:
    with pytest.raises(AuthError) as err:
        call()
    return err.value.code


def test_valid_token_passes():
    claims = verify(token())
    assert (claims.aud, claims.method, claims.bh) == (["m1"], "predict", sha256_b64url(SHARED))


@pytest.mark.parametrize(
    ("now", "accepted"),
    [
        (NOW, True),  # issued this second
        (NOW - 1, False),  # issued 1 s in the future: no skew on iat (the restart window, SMP-10)
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


def test_an_enrolled_tls_key_list_binds_the_signing_key_to_the_peers_tls_key():
    """SMP-5a applies only where the registry names enrolled TLS keys (the chain's slots), never to the file's None."""
    peer_spki = hashlib.sha256(b"the peer certificate's SubjectPublicKeyInfo").digest()

    def verify_with(enrolled: frozenset[bytes] | None):
        ctx = rules.CallContext(CRUNCH, RPC, PEER, CERT, BODY, NOW, 0, frozenset({DEST}), peer_spki_sha256=peer_spki)
        return rules.verify_token([token()], ctx, snap(registry(enrolled_tls_keys=enrolled)))

    verify_with(None)
    verify_with(frozenset({bytes(32), peer_spki}))
    for enrolled in (frozenset(), frozenset({hashlib.sha256(b"another key").digest()})):
        assert code_of(lambda: verify_with(enrolled)) == ErrorCode.COORDINATOR_CERT_NOT_ENROLLED


def _resign(claims: dict, footer: bytes = b'{"kid":"kcoordinator"}') -> bytes:
    return paseto.sign(KEY, json.dumps(claims).encode(), footer, IMPLICIT_ASSERTION)


def _claims(tok: bytes) -> dict:
    message, _, _ = paseto.split(tok)
    return json.loads(message)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda c: c.update(v=1), ErrorCode.TOKEN_UNSUPPORTED_VERSION),
        (lambda c: c.update(extra="x"), ErrorCode.TOKEN_MALFORMED),
        (lambda c: c.pop("nonce"), ErrorCode.TOKEN_MALFORMED),
        (lambda c: c.update(iat="1800000000"), ErrorCode.TOKEN_MALFORMED),
        (lambda c: c.update(kid="kother"), ErrorCode.TOKEN_MALFORMED),
    ],
    ids=["version-1", "extra-claim", "missing-nonce", "string-iat", "kid-mismatch"],
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
    reg = snap(registry())
    spki = hashlib.sha256(b"the watcher's SubjectPublicKeyInfo").digest()
    assert rules.authorize_watcher(CRUNCH, CRUNCH, PEER, spki, reg, NOW).ident == KID
    assert code_of(lambda: rules.authorize_watcher(CRUNCH, "other", PEER, spki, reg, NOW)) == ErrorCode.WATCHER_NOT_AUTHORIZED
    revoked = snap(registry(revoked=True))
    assert code_of(lambda: rules.authorize_watcher(CRUNCH, CRUNCH, PEER, spki, revoked, NOW)) == ErrorCode.KEY_REVOKED
    unregistered = (f"spiffe://{CRUNCH}/coordinator/kunknown",)
    assert code_of(lambda: rules.authorize_watcher(CRUNCH, CRUNCH, unregistered, spki, reg, NOW)) == ErrorCode.KEY_UNKNOWN
    stale = snap(registry(), NOW - 61)
    assert code_of(lambda: rules.authorize_watcher(CRUNCH, CRUNCH, PEER, spki, stale, NOW)) == ErrorCode.REGISTRY_STALE
    # SMP-5a on the watcher: a stream stays open only while its TLS key is enrolled (where the registry says).
    enrolled = snap(registry(enrolled_tls_keys=frozenset({spki})))
    assert rules.authorize_watcher(CRUNCH, CRUNCH, PEER, spki, enrolled, NOW).ident == KID
    moved = snap(registry(enrolled_tls_keys=frozenset({hashlib.sha256(b"another key").digest()})))
    assert code_of(lambda: rules.authorize_watcher(CRUNCH, CRUNCH, PEER, spki, moved, NOW)) == (
        ErrorCode.COORDINATOR_CERT_NOT_ENROLLED)


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


# -- SMP-11, SMP-13, SMP-14 and the start-time rule: authorize_call ---------------------


@dataclass
class Request:
    model_id: str
    method: str = "predict"


@dataclass
class CrunchWideRequest:  # WatchModels, an operator's listing: field 1 is the crunch id
    crunch_id: str


def authorize(tok: bytes, *, body=BODY, parsed=None, cache=None, now=NOW, started_at=0, rpc=RPC, seen=None):
    ctx = rules.CallContext(CRUNCH, rpc, PEER, CERT, body, now, started_at, frozenset({DEST}))
    parsed = parsed or Request(split_model_id(body)[0])
    cache = ReplayCache() if cache is None else cache  # an empty cache is falsy
    return rules.authorize_call([tok], ctx, snap(registry()), cache, lambda raw: parsed, seen=seen)


def test_one_token_serves_every_model_of_its_audience_once():
    tok = token(audience=["m1", "m2"])
    cache = ReplayCache()
    for model_id in ("m1", "m2"):
        claims, request = authorize(tok, body=model_id_field(model_id) + SHARED, cache=cache)
        assert request.model_id == model_id
    assert code_of(lambda: authorize(tok, cache=cache)) == ErrorCode.TOKEN_REPLAYED
    assert len(cache) == 2


def test_request_outside_the_audience_is_refused():
    assert code_of(lambda: authorize(token(), body=model_id_field("m2") + SHARED)) == ErrorCode.TOKEN_WRONG_AUDIENCE
    # A parsed model id that differs from the signed prefix (a second field 1 later on).
    assert code_of(lambda: authorize(token(), parsed=Request("m2"))) == ErrorCode.TOKEN_WRONG_AUDIENCE
    assert code_of(lambda: authorize(token(), parsed=Request("m1", "tick"))) == ErrorCode.TOKEN_WRONG_METHOD


@pytest.mark.parametrize("body", [SHARED, b"", b"\x0a\x40" + b"x" * 64, b"\x0a\x05m1"], ids=["no-prefix", "empty", "id-too-long", "truncated"])
def test_body_not_in_signed_form_is_refused(body):
    assert code_of(lambda: verify(token(), body=body)) == ErrorCode.TOKEN_BODY_MISMATCH


def test_tokens_issued_before_the_verifier_started_are_refused():
    authorize(token(), started_at=NOW)
    assert code_of(lambda: authorize(token(), started_at=NOW + 1)) == ErrorCode.TOKEN_ISSUED_BEFORE_START


@pytest.mark.parametrize("ahead", [1, 3, 5])
def test_a_restart_accepts_again_only_a_token_of_its_own_second(ahead):
    """SMP-10: a verifier restarted at second S forgets its replay cache. A token dated inside
    the skew (`ahead` s in the future) was never accepted before the restart, so it cannot be
    replayed after it; what the old verifier accepted at second t <= S has iat <= t."""
    future = token(now=NOW + ahead)
    assert code_of(lambda: authorize(future, now=NOW, started_at=NOW - 10)) == ErrorCode.TOKEN_NOT_YET_VALID
    accepted_before = token(now=NOW - 1)
    authorize(accepted_before, now=NOW - 1, started_at=NOW - 10)
    restarted_at = NOW
    assert code_of(lambda: authorize(accepted_before, now=NOW, started_at=restarted_at)) == (
        ErrorCode.TOKEN_ISSUED_BEFORE_START
    )
    same_second = token(now=NOW)
    authorize(same_second, now=NOW, started_at=NOW - 10)
    authorize(same_second, now=NOW, started_at=restarted_at)  # the documented residue: the restart's own second


def test_replay_cache_is_bounded_and_fails_closed():
    cache = ReplayCache(capacity=2)
    authorize(token(), cache=cache)
    authorize(token(), cache=cache)
    assert code_of(lambda: authorize(token(), cache=cache)) == ErrorCode.REPLAY_CACHE_FULL
    assert len(cache) == 2
    # Once the cached tokens can no longer pass the time check, their entries make room.
    later = NOW + 30 + 5
    authorize(token(now=later), cache=cache, now=later)
    assert len(cache) == 1


# -- SMP-30..35: runner identity delegation ---------------------------------------------

CRUNCHER = SigningKey(b"\x02" * 32)
SPKI = "S" * 43


def model_registry(cruncher_key=CRUNCHER) -> Registry:
    model = ModelEntry(
        model_id="m1", cruncher_id="alice", identity_public_key=base64.b64encode(bytes(cruncher_key.verify_key)).decode()
    )
    return Registry(crunches={CRUNCH: CrunchEntry(models=[model])})


def delegation(key=CRUNCHER, **overrides) -> bytes:
    fields = dict(crunch_id=CRUNCH, model_id="m1", spki_sha256=SPKI, now=NOW, lifetime=86400)
    fields.update(overrides)
    return issue_delegation(key, **fields)


def check(tok: bytes, *, reg=None, model_id="m1", spki=SPKI, now=NOW, fetched_at=None):
    return rules.verify_delegation(
        tok, registry=snap(reg or model_registry(), now if fetched_at is None else fetched_at), crunch_id=CRUNCH, model_id=model_id,
        presented_spki_sha256=spki, now=now,
    )


def test_valid_delegation_names_model_and_key():
    claims = check(delegation())
    assert (claims.model, claims.spki) == ("m1", SPKI)


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: check(b""), ErrorCode.DELEGATION_MISSING),
        (lambda: check(b"v4.public." + b"A" * 3000), ErrorCode.DELEGATION_MALFORMED),
        (lambda: check(delegation(), reg=Registry(crunches={CRUNCH: CrunchEntry()})), ErrorCode.MODEL_NOT_REGISTERED),
        (lambda: check(delegation(key=SigningKey(b"\x03" * 32))), ErrorCode.DELEGATION_BAD_SIGNATURE),
        (lambda: check(b"v4.local.xyz"), ErrorCode.DELEGATION_MALFORMED),
        (lambda: check(delegation(model_id="m2")), ErrorCode.DELEGATION_WRONG_MODEL),
        (lambda: check(delegation(crunch_id="other")), ErrorCode.DELEGATION_WRONG_MODEL),
        (lambda: check(delegation(), now=NOW + 86400 + 5), ErrorCode.DELEGATION_EXPIRED),
        (lambda: check(delegation(now=NOW + 60)), ErrorCode.DELEGATION_EXPIRED),
        (lambda: check(delegation(lifetime=40 * 86400)), ErrorCode.DELEGATION_EXPIRED),
        (lambda: check(delegation(), spki="T" * 43), ErrorCode.DELEGATION_KEY_MISMATCH),
        (lambda: check(delegation(), fetched_at=NOW - 61), ErrorCode.REGISTRY_STALE),  # SMP-31
    ],
    ids=["missing", "oversized", "not-registered", "other-signer", "not-v4-public", "other-model", "other-crunch",
         "expired", "future", "too-long", "other-tls-key", "stale-registry"],
)
def test_delegation_rules(make, code):
    assert code_of(make) == code


def test_a_call_token_is_never_a_delegation():
    # Same key, PASETO v4.public, but signed for calls: the implicit assertions differ.
    call_token = issue_call_token(
        CRUNCHER, key_id="alice", crunch_id=CRUNCH, audience=["m1"], destinations=[DEST], rpc=RPC, method="",
        shared_body=b"", cert_sha256=CERT, now=NOW,
    )
    assert code_of(lambda: check(call_token)) == ErrorCode.DELEGATION_BAD_SIGNATURE


# -- SMP-4a: a certificate works only with its own key; roles ---------------------------

OTHER_KEY = SigningKey(b"\x04" * 32)


def test_token_kid_must_be_the_key_its_certificate_names():
    # Both keys are registered: a certificate naming one and a token signed by the other is refused.
    reg = Registry(crunches={CRUNCH: CrunchEntry(coordinators=[registered(), registered("kother", OTHER_KEY)])})
    other_peer = (f"spiffe://{CRUNCH}/coordinator/kother",)
    assert code_of(lambda: verify(token(), peer=other_peer, reg=reg)) == ErrorCode.TOKEN_KID_MISMATCH
    verify(token(key=OTHER_KEY, key_id="kother"), peer=other_peer, reg=reg)
    # A revoked key's certificate no longer works with any other key.
    revoked = Registry(crunches={CRUNCH: CrunchEntry(coordinators=[registered(revoked=True), registered("kother", OTHER_KEY)])})
    assert code_of(lambda: verify(token(key=OTHER_KEY, key_id="kother"), reg=revoked)) == ErrorCode.TOKEN_KID_MISMATCH


def test_operator_methods_take_only_operator_certificates_and_keys():
    operator_peer = (f"spiffe://{CRUNCH}/operator/{KID}",)
    as_operator = Registry(crunches={CRUNCH: CrunchEntry(operators=[registered()])})
    verify(token(), peer=operator_peer, reg=as_operator, role=Role.OPERATOR)
    # A coordinator certificate, or a key registered only as a coordinator's, never passes for an operator.
    assert code_of(lambda: verify(token(), reg=as_operator, role=Role.OPERATOR)) == ErrorCode.PEER_UNAUTHENTICATED
    assert code_of(lambda: verify(token(), peer=operator_peer, role=Role.OPERATOR)) == ErrorCode.KEY_UNKNOWN
    # ... nor an operator's for a coordinator method.
    assert code_of(lambda: verify(token(), peer=operator_peer, reg=as_operator)) == ErrorCode.PEER_UNAUTHENTICATED
    now = datetime.fromtimestamp(NOW, UTC)
    assert as_operator.operator_key(CRUNCH, KID, now).key_id == KID
    assert code_of(lambda: as_operator.coordinator_key(CRUNCH, KID, now)) == ErrorCode.KEY_UNKNOWN


# -- SMP-4b: registry staleness; SMP-9a: destination -------------------------------------


def test_a_registry_older_than_the_maximum_age_refuses_every_call():
    verify(token(), fetched_at=NOW - 60)
    assert code_of(lambda: verify(token(), fetched_at=NOW - 61)) == ErrorCode.REGISTRY_STALE


def test_a_token_names_the_servers_that_may_accept_it():
    assert code_of(lambda: verify(token(destinations=["E" * 43]))) == ErrorCode.TOKEN_WRONG_DESTINATION
    verify(token(destinations=["E" * 43, DEST]))  # one signature for calls to several runners


# -- SMP-4 / SMP-7 / SMP-33: a repeated JSON member is ambiguous --------------------------


def _with_repeated(claims: dict, name: str, first: object) -> bytes:
    """Claims JSON naming `name` twice: first `first`, then the real value (which a last-wins parser keeps)."""
    body = json.dumps(claims)[1:]
    return ("{" + json.dumps(name) + ": " + json.dumps(first) + ", " + body).encode()


def test_repeated_json_members_are_refused():
    claims = _claims(token())
    repeated = paseto.sign(KEY, _with_repeated(claims, "aud", ["m9"]), b'{"kid":"kcoordinator"}', IMPLICIT_ASSERTION)
    assert code_of(lambda: verify(repeated)) == ErrorCode.TOKEN_MALFORMED
    footer = b'{"kid":"kother","kid":"kcoordinator"}'
    assert code_of(lambda: verify(_resign(claims, footer))) == ErrorCode.TOKEN_MALFORMED
    # Other encodings of the same members (spacing, order) are not ambiguous.
    verify(paseto.sign(KEY, json.dumps(dict(reversed(claims.items())), indent=1).encode(), b'{"kid": "kcoordinator"}', IMPLICIT_ASSERTION))


def test_a_delegation_with_a_repeated_member_is_refused():
    message = json.dumps(dict(v=1, crunch=CRUNCH, model="m1", spki=SPKI, iat=NOW, exp=NOW + 60))
    doubled = ('{"model": "m2", ' + message[1:]).encode()
    assert code_of(lambda: check(paseto.sign(CRUNCHER, doubled, b"", DELEGATION_ASSERTION))) == ErrorCode.DELEGATION_MALFORMED


KEY_B64 = base64.b64encode(bytes(KEY.verify_key)).decode()


@pytest.mark.parametrize(
    "text",
    [
        '{"crunches": {"c1": {}, "c1": {}}}',
        '{"crunches": {"c1": {"coordinators": [{"key_id": "k1", "public_key": "%s"},'
        ' {"key_id": "k1", "public_key": "%s", "revoked": true}]}}}' % (KEY_B64, KEY_B64),
        '{"crunches": {"c1": {"coordinators": [{"key_id": "k1", "public_key": "%s"}],'
        ' "operators": [{"key_id": "k1", "public_key": "%s"}]}}}' % (KEY_B64, KEY_B64),
        '{"crunches": {"c1": {"coordinators": [{"key_id": "k1", "public_key": "%s", "revoked": true,'
        ' "revoked": false}]}}}' % KEY_B64,
        '{"crunches": {"c1": {"models": [{"model_id": "m1"}, {"model_id": "m1", "model_name": "x"}]}}}',
    ],
    ids=["crunch-twice", "key-twice", "key-in-both-sections", "member-twice", "model-twice"],
)
def test_ambiguous_registries_are_refused(text):
    with pytest.raises(ConfigError) as err:
        Registry.from_json(text)
    assert err.value.code == ErrorCode.REGISTRY_AMBIGUOUS


# -- request subjects, and what a refusal's audit line can name ---------------------------


def test_a_crunch_wide_request_is_addressed_to_its_crunch():
    body = model_id_field(CRUNCH)  # WatchModelsRequest(crunch_id): its field 1 and nothing else
    tok = token(audience=[CRUNCH], shared_body=b"", method="")
    claims, request = authorize(tok, body=body, parsed=CrunchWideRequest(CRUNCH))
    assert rules.subject_and_targets(request) == (CRUNCH, [CRUNCH])
    assert code_of(lambda: authorize(token(shared_body=b"", method=""), body=model_id_field("m1"),
                                     parsed=CrunchWideRequest(CRUNCH))) == ErrorCode.TOKEN_WRONG_AUDIENCE


def test_a_refusal_names_the_claimed_key_models_and_nonce_once_read():
    seen: dict = {}
    assert code_of(lambda: verify(token(audience=["m1", "m2"]), fetched_at=NOW - 61, seen=seen)) == ErrorCode.REGISTRY_STALE
    assert seen == {"kid": KID}  # the claims were not trusted yet
    tok = token(audience=["m1", "m2"])
    seen = {}
    assert code_of(lambda: authorize(tok, body=model_id_field("m3") + SHARED, seen=seen)) == ErrorCode.TOKEN_WRONG_AUDIENCE
    assert seen == {"kid": KID, "models": "m1,m2", "nonce": _claims(tok)["nonce"]}


def test_the_destination_set_is_bounded_and_a_worst_case_token_fits_the_size_cap():
    widest = token(audience=[f"m{i:02d}" + "x" * 60 for i in range(MAX_AUDIENCE)],
                   destinations=[f"{i:02d}" + "D" * 41 for i in range(MAX_DESTINATIONS)])
    assert len(widest) <= MAX_TOKEN_BYTES
    claims = _claims(token())
    claims["dst"] = [DEST] * (MAX_DESTINATIONS + 1)
    assert code_of(lambda: verify(_resign(claims))) == ErrorCode.TOKEN_MALFORMED
