"""Attacks on a real runner over real mTLS: each is refused and the model never sees it.

Every test drives a `secure-runner runner` subprocess from the outside. "The
model never saw it" is proven by the model itself: the counter submission
counts every call it receives, and an authorized `count()` afterwards must
show the same number as before the attack.
"""

from __future__ import annotations

import time

import grpc
import pytest
from nacl.signing import SigningKey

from secure_runner.errors import ErrorCode
from secure_runner.smp.token import model_id_field
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import runner_pb2

from conftest import CALL_RPC, RawCoordinator, assert_refused, credentials

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


async def test_token_from_unregistered_key_is_refused(coordinator):
    before = await coordinator.count()
    rogue = SigningKey.generate()
    body = coordinator.call_body("echo", 1)
    token = coordinator.token(body, method="echo", key=rogue, key_id="k000000000000000000000000")
    await _refused(
        coordinator,
        coordinator.raw(CALL_RPC, body, ((TOKEN_KEY, token),)), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.KEY_UNKNOWN
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
async def test_forged_tokens_are_refused(coordinator, forgery, status, reason):
    before = await coordinator.count()
    body = coordinator.call_body("echo", 1)
    sign = coordinator.token
    tokens = {
        "tampered_body": [sign(coordinator.call_body("echo", 2), method="echo")],
        "other_certificate": [sign(body, method="echo", cert_sha256="A" * 43)],
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
