"""Attacks on a real runner over real mTLS: each is refused and the model never sees it.

Every test drives a `secure-runner runner` subprocess from the outside. "The
model never saw it" is proven by the model itself: the counter submission
counts every call it receives, and an authorized `count()` afterwards must
show the same number as before the attack.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from nacl.signing import SigningKey

from secure_runner import pki
from secure_runner.errors import ErrorCode
from secure_runner.smp import paseto
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.replay import ReplayCache
from secure_runner.smp.token import IMPLICIT_ASSERTION, model_id_field
from secure_runner.transport import tls
from secure_runner.transport.registry_file import REGISTRY_HEALTH_SERVICE
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.transport.decisions import DecisionRecorder
from secure_runner.transport.token_auth import TokenAuthInterceptor
from secure_runner.v1 import runner_pb2, runner_pb2_grpc

from conftest import CALL_RPC, CRUNCH, RawCoordinator, assert_refused, credentials, forge_certificate, forged_credentials

OK = runner_pb2.CALL_STATUS_SUCCESS


@pytest.fixture
async def coordinator(layout, runners):
    runner = runners["counter"]
    client = RawCoordinator(layout, runner.address, "counter")
    assert (await client.setup()).status == OK
    client.runner = runner
    yield client
    await client.close()


async def _refused(coordinator, call, status, reason):
    """Refused with this status and reason; audited as a denial when the runner saw the call."""
    await assert_refused(call, status, reason, audited_by=coordinator.runner if reason else None)


async def test_authorized_call_reaches_the_model(coordinator):
    before = await coordinator.count()
    response = await coordinator.call("echo", {"x": [1, 2.5, "z"]})
    assert response.status == OK
    assert await coordinator.count() == before + 1


async def test_plaintext_client_is_refused(coordinator, runners):
    before = await coordinator.count()
    async with grpc.aio.insecure_channel(runners["counter"].address) as channel:
        body = coordinator.call_body("echo", 1)
        stub = channel.unary_unary(CALL_RPC, response_deserializer=runner_pb2.CallResponse.FromString)
        await _refused(
        coordinator,
            stub(body, metadata=((TOKEN_KEY, coordinator.token(body, method="echo")),), timeout=5),
            grpc.StatusCode.UNAVAILABLE,
            None,
        )
    assert await coordinator.count() == before


async def test_client_without_certificate_is_refused(coordinator, layout, runners):
    before = await coordinator.count()
    anonymous = RawCoordinator(layout, runners["counter"].address, "counter", creds=credentials(layout, client_cert=False))
    await _refused(coordinator, anonymous.call("echo", 1, timeout=5), grpc.StatusCode.UNAVAILABLE, None)
    await anonymous.close()
    assert await coordinator.count() == before


async def test_client_certificate_from_another_ca_is_refused(coordinator, other_layout, runners):
    before = await coordinator.count()
    # The other CA's coordinator has the same names and its own CA as trust root, so
    # only the runner's client-CA check can stop it.
    creds = grpc.ssl_channel_credentials(
        root_certificates=coordinator.layout.ca_cert.read_bytes(),
        private_key=other_layout.coordinator_key.read_bytes(),
        certificate_chain=other_layout.coordinator_cert.read_bytes(),
    )
    intruder = RawCoordinator(other_layout, runners["counter"].address, "counter", creds=creds)
    await _refused(coordinator, intruder.call("echo", 1, timeout=5), grpc.StatusCode.UNAVAILABLE, None)
    await intruder.close()
    assert await coordinator.count() == before


async def test_server_with_another_models_certificate_is_refused_before_sending(layout, runners):
    # The client expects "async-model"; the server holds the counter's certificate.
    client = RawCoordinator(layout, runners["counter"].address, "async-model")
    await assert_refused(client.call("echo", 1, timeout=5), grpc.StatusCode.UNAVAILABLE, None)
    await client.close()


async def test_call_without_token_is_refused(coordinator):
    before = await coordinator.count()
    body = coordinator.call_body("echo", 1)
    await _refused(coordinator, coordinator.raw(CALL_RPC, body), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_MISSING)
    assert await coordinator.count() == before


async def test_token_from_unregistered_key_is_refused(coordinator, layout):
    before = await coordinator.count()
    rogue = SigningKey.generate()
    rogue_id = pki.key_id_for(bytes(rogue.verify_key))
    body = coordinator.call_body("echo", 1)
    # A certificate from the crunch CA naming the rogue key: the key is not registered.
    cert, key = forge_certificate(layout, uris=[f"spiffe://{CRUNCH}/coordinator/{rogue_id}"])
    intruder = RawCoordinator(layout, coordinator.runner.address, "counter", creds=forged_credentials(layout, cert, key))
    token = intruder.token(body, method="echo", key=rogue, key_id=rogue_id, cert_sha256=tls.cert_sha256(tls.pem_to_der(cert)))
    await _refused(
        coordinator,
        intruder.raw(CALL_RPC, body, ((TOKEN_KEY, token),)), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.KEY_UNKNOWN
    )
    await intruder.close()
    # On the registered coordinator's certificate, a token of another key id: SMP-4a.
    token = coordinator.token(body, method="echo", key=rogue, key_id=rogue_id)
    await _refused(
        coordinator,
        coordinator.raw(CALL_RPC, body, ((TOKEN_KEY, token),)), grpc.StatusCode.UNAUTHENTICATED,
        ErrorCode.TOKEN_KID_MISMATCH,
    )
    # The registered key id with another key's signature is a bad signature.
    token = coordinator.token(body, method="echo", key=rogue)
    await _refused(
        coordinator,
        coordinator.raw(CALL_RPC, body, ((TOKEN_KEY, token),)),
        grpc.StatusCode.UNAUTHENTICATED,
        ErrorCode.TOKEN_BAD_SIGNATURE,
    )
    assert await coordinator.count() == before


async def test_expired_token_is_refused(coordinator):
    before = await coordinator.count()
    body = coordinator.call_body("echo", 1)
    token = coordinator.token(body, method="echo", now=int(time.time()) - 120, lifetime=30)
    await _refused(
        coordinator,
        coordinator.raw(CALL_RPC, body, ((TOKEN_KEY, token),)), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_EXPIRED
    )
    assert await coordinator.count() == before


@pytest.mark.parametrize(
    ("forgery", "status", "reason"),
    [
        ("tampered_body", grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_BODY_MISMATCH),
        ("other_certificate", grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_CERT_MISMATCH),
        ("other_crunch", grpc.StatusCode.PERMISSION_DENIED, ErrorCode.TOKEN_WRONG_CRUNCH),
        ("other_rpc", grpc.StatusCode.PERMISSION_DENIED, ErrorCode.TOKEN_WRONG_METHOD),
        ("other_model_method", grpc.StatusCode.PERMISSION_DENIED, ErrorCode.TOKEN_WRONG_METHOD),
        ("other_audience", grpc.StatusCode.PERMISSION_DENIED, ErrorCode.TOKEN_WRONG_AUDIENCE),
        ("lifetime_too_long", grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_LIFETIME_TOO_LONG),
        ("issued_in_future", grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_NOT_YET_VALID),
        ("garbage_token", grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_UNSUPPORTED_VERSION),
        ("oversized_token", grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_TOO_LARGE),
        ("two_tokens", grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_MALFORMED),
    ],
)
async def test_forged_tokens_are_refused(coordinator, layout, forgery, status, reason):
    before = await coordinator.count()
    body = coordinator.call_body("echo", 1)
    sign = coordinator.token
    # Another real certificate of the same coordinator identity (same CA, same SPIFFE id, its own key):
    # a token bound to it is useless on this connection.
    other_cert, _ = forge_certificate(layout, uris=[f"spiffe://{CRUNCH}/coordinator/{coordinator.key_id}"])
    tokens = {
        "tampered_body": [sign(coordinator.call_body("echo", 2), method="echo")],
        "other_certificate": [sign(body, method="echo", cert_sha256=tls.cert_sha256(tls.pem_to_der(other_cert)))],
        "other_crunch": [sign(body, method="echo", crunch_id="another-crunch")],
        "other_rpc": [sign(body, rpc="/secure_runner.v1.ModelRunner/Reset", method="echo")],
        "other_model_method": [sign(body, method="fail")],
        "other_audience": [sign(body, method="echo", audience=["async-model"])],
        "lifetime_too_long": [sign(body, method="echo", lifetime=3600)],
        "issued_in_future": [sign(body, method="echo", now=int(time.time()) + 600)],
        "garbage_token": [b"\x00garbage"],
        "oversized_token": [b"v4.public." + b"A" * 9000],
        "two_tokens": [sign(body, method="echo"), sign(body, method="echo")],
    }[forgery]
    metadata = tuple((TOKEN_KEY, token) for token in tokens)
    await _refused(coordinator, coordinator.raw(CALL_RPC, body, metadata), status, reason)
    assert await coordinator.count() == before


async def test_unparsable_request_without_token_is_refused_unparsed(coordinator):
    # Authentication comes first: garbage without a token is UNAUTHENTICATED, not a parse error.
    await _refused(coordinator, coordinator.raw(CALL_RPC, b"\xff\xff\xff"), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_MISSING)


async def test_unparsable_request_with_valid_token_is_invalid_argument(coordinator):
    before = await coordinator.count()
    garbage = model_id_field("counter") + b"\xff\xff\xff"
    token = coordinator.token(garbage, method="echo")
    await _refused(
        coordinator,
        coordinator.raw(CALL_RPC, garbage, ((TOKEN_KEY, token),)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ErrorCode.MALFORMED_REQUEST,
    )
    assert await coordinator.count() == before


@pytest.mark.parametrize("method", ["__init__", "__class__", "_private", "secret_method", "no_such_method", ""])
async def test_undeclared_methods_are_refused(coordinator, method):
    before = await coordinator.count()
    await _refused(coordinator, coordinator.call(method), grpc.StatusCode.PERMISSION_DENIED, ErrorCode.METHOD_NOT_ALLOWED)
    assert await coordinator.count() == before


async def test_unknown_model_is_not_found(layout, runners):
    client = RawCoordinator(layout, runners["counter"].address, "nobody-here", server_model_id="counter")
    await assert_refused(
        client.call("echo", 1), grpc.StatusCode.NOT_FOUND, ErrorCode.MODEL_UNKNOWN, audited_by=runners["counter"]
    )
    await client.close()


async def test_bad_arguments_are_the_callers_error_and_reach_no_model_code(coordinator):
    before = await coordinator.count()
    request = runner_pb2.CallRequest(method="echo")
    request.arguments.add(position=2)  # positions must start at 1
    body = model_id_field("counter") + request.SerializeToString()
    response = await coordinator.raw(CALL_RPC, body, ((TOKEN_KEY, coordinator.token(body, method="echo")),))
    assert response.status == runner_pb2.CALL_STATUS_FAILURE
    assert response.error.code == ErrorCode.INVALID_ARGUMENTS
    assert await coordinator.count() == before


# -- a certificate works only with its own signing key (SMP-4a) --------------------------


def _private_layout(layout, tmp_path) -> pki.PkiLayout:
    """A copy of the PKI whose registry a test may change without touching the others."""
    return pki.PkiLayout(shutil.copytree(layout.root, tmp_path / "pki"))


def _edit_registry(layout: pki.PkiLayout, edit) -> None:
    data = json.loads(layout.registry.read_text())
    edit(data["crunches"][CRUNCH])
    layout.registry.write_text(json.dumps(data))


async def test_a_certificate_works_only_with_its_own_signing_key(layout, tmp_path, fresh_runner):
    private = _private_layout(layout, tmp_path)
    second = SigningKey.generate()
    second_id = pki.key_id_for(bytes(second.verify_key))
    entry = {"key_id": second_id, "public_key": base64.b64encode(bytes(second.verify_key)).decode()}
    _edit_registry(private, lambda crunch: crunch["coordinators"].append(entry))
    runner = fresh_runner("counter", None, "--registry", str(private.registry))
    owner = RawCoordinator(layout, runner.address, "counter")
    assert (await owner.setup()).status == OK
    before = await owner.count()
    # The registered coordinator's certificate, with a token signed by the other registered key.
    body = owner.call_body("echo", 1)
    crossed = owner.token(body, method="echo", key=second, key_id=second_id)
    await assert_refused(
        owner.raw(CALL_RPC, body, ((TOKEN_KEY, crossed),)), grpc.StatusCode.UNAUTHENTICATED,
        ErrorCode.TOKEN_KID_MISMATCH, audited_by=runner,
    )
    denial = runner.audit_entries()[-1]
    assert denial["what"]["kid"] == second_id  # the audit line names the key that signed
    assert await owner.count() == before  # the crossed call never reached the model
    # Once the first key is revoked, its certificate no longer works with the other key either.
    _edit_registry(private, lambda crunch: crunch["coordinators"][0].update(revoked=True))
    await asyncio.sleep(1.2)
    await assert_refused(
        owner.raw(CALL_RPC, body, ((TOKEN_KEY, owner.token(body, method="echo", key=second, key_id=second_id)),)),
        grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_KID_MISMATCH, audited_by=runner,
    )
    # The other key's own certificate still works, and the allow line names its key.
    cert, key = forge_certificate(layout, uris=[f"spiffe://{CRUNCH}/coordinator/{second_id}"])
    holder = RawCoordinator(layout, runner.address, "counter", creds=forged_credentials(layout, cert, key))
    token = holder.token(body, method="echo", key=second, key_id=second_id, cert_sha256=tls.cert_sha256(tls.pem_to_der(cert)))
    assert (await holder.raw(CALL_RPC, body, ((TOKEN_KEY, token),))).status == OK
    allowed = runner.audit_entries()[-1]
    assert (allowed["decision"], allowed["what"]["kid"], allowed["what"]["models"]) == ("allow", second_id, "counter")
    await holder.close()
    await owner.close()


# -- SMP-7: a repeated claim is ambiguous ----------------------------------------------------


async def test_a_token_repeating_a_claim_is_refused(coordinator):
    """Signed by the real key, but naming `aud` twice: a last-wins parser would read only the second."""
    before = await coordinator.count()
    body = coordinator.call_body("echo", 1)
    message, _, footer = paseto.split(coordinator.token(body, method="echo"))
    doubled = b'{"aud":["async-model"],' + message[1:]
    token = paseto.sign(coordinator.key, doubled, footer, IMPLICIT_ASSERTION)
    await _refused(
        coordinator, coordinator.raw(CALL_RPC, body, ((TOKEN_KEY, token),)), grpc.StatusCode.UNAUTHENTICATED,
        ErrorCode.TOKEN_MALFORMED,
    )
    assert await coordinator.count() == before


# -- health: a crunch coordinator's question, judged before the request is parsed ----------


async def test_health_answers_only_coordinators_and_judges_the_peer_before_parsing(coordinator, layout, runners):
    health_check = "/grpc.health.v1.Health/Check"
    ok = await coordinator.raw(health_check, b"", response_type=health_pb2.HealthCheckResponse)
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    # A runner's certificate from the same CA learns nothing, not even whether the request parses.
    runner_creds = grpc.ssl_channel_credentials(
        layout.ca_cert.read_bytes(), layout.runner_key("async-model").read_bytes(),
        layout.runner_cert("async-model").read_bytes(),
    )
    neighbour = RawCoordinator(layout, runners["counter"].address, "counter", creds=runner_creds)
    for body in (b"", b"\xff\xff\xff"):
        await assert_refused(
            neighbour.raw(health_check, body, response_type=health_pb2.HealthCheckResponse),
            grpc.StatusCode.UNAUTHENTICATED, ErrorCode.PEER_UNAUTHENTICATED, audited_by=runners["counter"],
        )
    await neighbour.close()


# -- the registry: any source failure is typed and audited; a bad reload is visible, then stale


class _Audit:
    def __init__(self) -> None:
        self.lines: list[dict] = []

    def record(self, **line) -> None:
        self.lines.append(line)


async def test_any_registry_source_failure_is_a_typed_audited_refusal(layout):
    """A registry adapter that fails in a way nobody foresaw (here a RuntimeError) refuses the call."""

    def broken_source():
        raise RuntimeError("chain RPC returned garbage")

    audit = _Audit()
    server_files = tls.TlsFiles(layout.runner_cert("counter"), layout.runner_key("counter"), layout.ca_cert)
    destination = tls.spki_sha256(tls.pem_to_der(layout.runner_cert("counter").read_bytes()))
    auth = TokenAuthInterceptor(
        CRUNCH, [CALL_RPC], broken_source, DecisionRecorder(audit), replay=ReplayCache(),
        destinations=lambda: frozenset({destination}),
    )
    server = grpc.aio.server(interceptors=[auth])

    class Runner(runner_pb2_grpc.ModelRunnerServicer):
        async def Call(self, request, context):
            raise AssertionError("never reached")

    runner_pb2_grpc.add_ModelRunnerServicer_to_server(Runner(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.reloading_server_credentials(server_files, PeerIdentity.make(CRUNCH, Role.RUNNER, "counter")))
    await server.start()
    client = RawCoordinator(layout, f"127.0.0.1:{port}", "counter")
    try:
        await assert_refused(client.call("echo", 1), grpc.StatusCode.UNAVAILABLE, ErrorCode.REGISTRY_UNAVAILABLE)
        assert [(line["decision"], line["code"]) for line in audit.lines] == [("deny", ErrorCode.REGISTRY_UNAVAILABLE)]
    finally:
        await client.close()
        await server.stop(0)


async def _registry_health(client: RawCoordinator) -> int:
    request = health_pb2.HealthCheckRequest(service=REGISTRY_HEALTH_SERVICE).SerializeToString()
    return (await client.raw("/grpc.health.v1.Health/Check", request, response_type=health_pb2.HealthCheckResponse)).status


async def test_an_ambiguous_registry_is_refused_visibly_and_goes_stale(layout, tmp_path, fresh_runner):
    """A revocation added as a second entry for the key: the registry is ambiguous, so it is not used;
    the runner says so (audit line, health) and, past --max-registry-age, refuses every call."""
    private = _private_layout(layout, tmp_path)
    runner = fresh_runner("counter", None, "--registry", str(private.registry), "--max-registry-age", "3")
    client = RawCoordinator(layout, runner.address, "counter")
    assert (await client.setup()).status == OK
    assert await _registry_health(client) == health_pb2.HealthCheckResponse.SERVING

    def add_revocation(crunch):
        crunch["coordinators"].append(dict(crunch["coordinators"][0], revoked=True))

    _edit_registry(private, add_revocation)
    await asyncio.sleep(1.3)
    refused = [line for line in runner.audit_entries() if line["code"] == ErrorCode.REGISTRY_AMBIGUOUS]
    assert [line["decision"] for line in refused] == ["deny"], runner.audit_entries()[-3:]
    assert await _registry_health(client) == health_pb2.HealthCheckResponse.NOT_SERVING
    await asyncio.sleep(3)
    await assert_refused(client.call("echo", 1), grpc.StatusCode.UNAVAILABLE, ErrorCode.REGISTRY_STALE, audited_by=runner)
    # A fixed registry (the revocation as the key's only entry) is used at once.
    _edit_registry(private, lambda crunch: crunch["coordinators"].pop(0))
    await asyncio.sleep(1.3)
    assert await _registry_health(client) == health_pb2.HealthCheckResponse.SERVING
    await assert_refused(client.call("echo", 2), grpc.StatusCode.PERMISSION_DENIED, ErrorCode.KEY_REVOKED, audited_by=runner)
    await client.close()
