"""The Secure Model Protocol attack suite, part 2: certificates, revocation, replay, floods, reports.

Real runners and a real orchestrator over TLS. Each refused call asserts the
gRPC status and reason code, that the model never ran (it counts its calls),
and the audit line the server wrote. Refusals made by the TLS layer itself
(no certificate, wrong CA, expired certificate) never reach the application,
so they carry no reason code and no audit line; grpc logs the handshake error.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from secure_runner import CallStatus, CoordinatorSecurity, DynamicSubclassModelConcurrentRunner, pki
from secure_runner.codec import encode_arguments
from secure_runner.pki import load_signing_key
from secure_runner.errors import ErrorCode
from secure_runner.orchestrator.local import LocalOrchestrator, LocalOrchestratorSettings
from secure_runner.orchestrator.service import REPORT_RPC
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.token import model_id_field
from secure_runner.transport import tls
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import orchestrator_pb2, orchestrator_pb2_grpc, runner_pb2, values_pb2

from conftest import (
    BASE_PATH,
    CALL_RPC,
    CRUNCH,
    MODELS,
    RawCoordinator,
    assert_refused,
    by_id,
    forge_certificate,
    forged_credentials,
)

OK = runner_pb2.CALL_STATUS_SUCCESS


async def _ready(layout, runner, **kwargs) -> RawCoordinator:
    client = RawCoordinator(layout, runner.address, runner.model_id, **kwargs)
    assert (await client.setup()).status == OK
    return client


def _copy_layout(layout: pki.PkiLayout, tmp_path) -> pki.PkiLayout:
    """A private copy of the PKI, so a test may revoke keys without touching the others."""
    return pki.PkiLayout(shutil.copytree(layout.root, tmp_path / "pki"))


def _revoke_coordinator(layout: pki.PkiLayout) -> None:
    data = json.loads(layout.registry.read_text())
    for key in data["crunches"][CRUNCH]["coordinators"]:
        key["revoked"] = True
    layout.registry.write_text(json.dumps(data))


# -- certificates ------------------------------------------------------------------------


async def test_expired_client_certificate_is_refused(layout, runners):
    runner = runners["counter"]
    owner = await _ready(layout, runner)
    before = await owner.count()
    now = datetime.now(UTC)
    cert, key = forge_certificate(
        layout,
        uris=[f"spiffe://{CRUNCH}/coordinator/{owner.key_id}"],
        not_before=now - timedelta(days=10),
        not_after=now - timedelta(days=1),
    )
    expired = RawCoordinator(layout, runner.address, "counter", creds=forged_credentials(layout, cert, key))
    await assert_refused(expired.call("echo", 1, timeout=5), grpc.StatusCode.UNAVAILABLE, None)
    assert await owner.count() == before
    await expired.close()
    await owner.close()


async def test_certificate_with_two_uri_sans_is_refused(layout, runners):
    runner = runners["counter"]
    owner = await _ready(layout, runner)
    before = await owner.count()
    cert, key = forge_certificate(
        layout,
        uris=[f"spiffe://{CRUNCH}/coordinator/{owner.key_id}", f"spiffe://{CRUNCH}/coordinator/other"],
    )
    ambiguous = RawCoordinator(layout, runner.address, "counter", creds=forged_credentials(layout, cert, key))
    ambiguous.cert_sha256 = tls.cert_sha256(tls.pem_to_der(cert))  # the token binds this very certificate
    await assert_refused(
        ambiguous.call("echo", 1), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.PEER_UNAUTHENTICATED, audited_by=runner
    )
    assert await owner.count() == before
    await ambiguous.close()
    await owner.close()


# -- revocation, replay, time -----------------------------------------------------------


async def test_revoked_key_is_refused_on_a_live_connection_after_reload(layout, tmp_path, fresh_runner):
    private = _copy_layout(layout, tmp_path)
    runner = fresh_runner("counter", None, "--registry", str(private.registry))
    client = await _ready(layout, runner)
    assert (await client.call("echo", 1)).status == OK
    _revoke_coordinator(private)
    # The registry is re-read within 1 s of a change; the same channel (same TLS connection) is used.
    await asyncio.sleep(1.2)
    await assert_refused(
        client.call("echo", 2), grpc.StatusCode.PERMISSION_DENIED, ErrorCode.KEY_REVOKED, audited_by=runner
    )
    await client.close()


async def test_token_replayed_on_the_same_runner_and_after_a_restart(layout, fresh_runner):
    runner = fresh_runner("counter")
    client = await _ready(layout, runner)
    body = client.call_body("echo", "once")
    metadata = ((TOKEN_KEY, client.token(body, method="echo")),)
    assert (await client.raw(CALL_RPC, body, metadata)).status == OK
    await assert_refused(
        client.raw(CALL_RPC, body, metadata), grpc.StatusCode.PERMISSION_DENIED, ErrorCode.TOKEN_REPLAYED,
        audited_by=runner,
    )
    await client.close()

    runner.stop()  # the restarted runner's replay cache is empty ...
    await asyncio.sleep(1.0)  # ... so it refuses every token issued before it started
    restarted = fresh_runner("counter")
    replayer = RawCoordinator(layout, restarted.address, "counter")
    await assert_refused(
        replayer.raw(CALL_RPC, body, metadata), grpc.StatusCode.UNAUTHENTICATED,
        ErrorCode.TOKEN_ISSUED_BEFORE_START, audited_by=restarted,
    )
    assert (await replayer.setup()).status == OK and await replayer.count() == 0
    await replayer.close()


async def test_replay_cache_flood_fails_closed(layout, fresh_runner):
    runner = fresh_runner("counter", None, "--replay-cache-size", "4")
    client = RawCoordinator(layout, runner.address, "counter")
    assert (await client.setup()).status == OK  # 1 nonce
    for value in range(2):
        assert (await client.call("echo", value)).status == OK  # 2 more
    assert await client.count() == 2  # the 4th nonce: the cache is now full
    await assert_refused(
        client.call("echo", "flood"), grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorCode.REPLAY_CACHE_FULL,
        audited_by=runner,
    )
    await client.close()


@pytest.mark.parametrize(("expired_for", "accepted"), [(-2, True), (1, False)], ids=["valid-2s-left", "expired-1s-ago"])
async def test_expiry_with_skew_boundary(coordinator_for_counter, expired_for, accepted):
    client, runner = coordinator_for_counter
    # Tokens issued before the runner started are refused on their own (SMP-10): let it age.
    await asyncio.sleep(max(0.0, runner.started_at + 6 - time.time()))
    before = await client.count()
    now = int(time.time())
    exp = now - 5 - expired_for  # the runner accepts while now - 5 s skew < exp
    body = client.call_body("echo", "edge")
    metadata = ((TOKEN_KEY, client.token(body, method="echo", now=exp - 1, lifetime=1)),)
    if accepted:
        assert (await client.raw(CALL_RPC, body, metadata)).status == OK
        assert await client.count() == before + 1
    else:
        await assert_refused(
            client.raw(CALL_RPC, body, metadata), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_EXPIRED,
            audited_by=runner,
        )
        assert await client.count() == before


@pytest.fixture
async def coordinator_for_counter(layout, runners):
    runner = runners["counter"]
    client = await _ready(layout, runner)
    yield client, runner
    await client.close()


# -- floods and malformed traffic --------------------------------------------------------


async def test_idle_tls_handshakes_are_closed_while_real_calls_are_served(layout, fresh_runner):
    runner = fresh_runner("counter", None, "--handshake-timeout-ms", "1000")
    idle = [socket.create_connection(("127.0.0.1", runner.port)) for _ in range(20)]
    client = await _ready(layout, runner)
    assert (await client.call("echo", "served")).status == OK
    await asyncio.sleep(2.0)
    for sock in idle:
        sock.settimeout(5)
        assert sock.recv(1) == b""  # the server closed the never-finished handshake
        sock.close()
    assert (await client.call("echo", "still served")).status == OK
    await client.close()


async def test_stream_flood_is_refused_and_the_runner_keeps_serving(layout, runners):
    runner = runners["counter"]
    owner = await _ready(layout, runner)
    before = await owner.count()
    flooder = RawCoordinator(layout, runner.address, "counter")
    body = flooder.call_body("echo", 1)
    results = await asyncio.gather(
        *(flooder.raw(CALL_RPC, body, timeout=20) for _ in range(600)), return_exceptions=True
    )
    # Every stream is refused: by the token check, or (past 128 concurrent streams) by HTTP/2 itself.
    codes = {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)}
    assert len(results) == 600 and all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    assert grpc.StatusCode.UNAUTHENTICATED in codes and codes <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE}
    assert (await owner.call("echo", "after the flood")).status == OK
    assert await owner.count() == before + 1
    await flooder.close()
    await owner.close()


async def test_metadata_flood_is_refused_before_the_model(coordinator_for_counter):
    client, _ = coordinator_for_counter
    before = await client.count()
    body = client.call_body("echo", 1)
    metadata = ((TOKEN_KEY, client.token(body, method="echo")), *((f"x-pad-{i}", "y" * 1000) for i in range(40)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.raw(CALL_RPC, body, metadata)
    assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    assert await client.count() == before


async def test_oversized_message_is_refused_before_the_model(coordinator_for_counter):
    client, _ = coordinator_for_counter
    before = await client.count()
    oversized = values_pb2.Argument(
        position=1, data=values_pb2.Variant(type=values_pb2.BYTES, value=b"x" * (tls.MAX_MESSAGE_BYTES + 1024))
    )
    body = model_id_field("counter") + runner_pb2.CallRequest(method="echo", arguments=[oversized]).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.raw(CALL_RPC, body, ((TOKEN_KEY, client.token(body, method="echo")),), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await client.count() == before


async def test_unknown_grpc_method_is_unimplemented(coordinator_for_counter):
    client, _ = coordinator_for_counter
    body = client.call_body("echo", 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.raw("/secure_runner.v1.ModelRunner/Exec", body, ((TOKEN_KEY, client.token(body)),))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- the orchestrator: watchers and failure reports ----------------------------------------


@pytest.fixture
async def private_orchestrator(layout, tmp_path):
    """An in-process orchestrator over its own copy of the PKI, with the counter model."""
    private = _copy_layout(layout, tmp_path)
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    (submissions / "counter").symlink_to(MODELS / "submissions" / "counter")
    orchestrator = LocalOrchestrator(
        LocalOrchestratorSettings(crunch_id=CRUNCH, submissions=submissions, pki_dir=private.root, base_paths=[BASE_PATH])
    )
    await orchestrator.start()
    yield orchestrator, private
    await orchestrator.stop()


def _orchestrator_channel(layout, port, creds=None):
    name = PeerIdentity.make(CRUNCH, Role.ORCHESTRATOR, "orchestrator").tls_server_name
    creds = creds or tls.channel_credentials(tls.TlsFiles(layout.coordinator_cert, layout.coordinator_key, layout.ca_cert))
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=tls.channel_options(name))


def _audit(orchestrator) -> list[dict]:
    return [json.loads(line) for line in (orchestrator.settings.audit_folder / "orchestrator.jsonl").read_text().splitlines()]


async def test_watcher_with_unregistered_key_is_refused(private_orchestrator):
    orchestrator, private = private_orchestrator
    cert, key = forge_certificate(private, uris=[f"spiffe://{CRUNCH}/coordinator/knotregistered"])
    async with _orchestrator_channel(private, orchestrator.port, forged_credentials(private, cert, key)) as channel:
        stream = orchestrator_pb2_grpc.OrchestratorStub(channel).WatchModels(
            orchestrator_pb2.WatchModelsRequest(crunch_id=CRUNCH)
        )
        await assert_refused(stream.read(), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.KEY_UNKNOWN)
    assert (_audit(orchestrator)[-1]["decision"], _audit(orchestrator)[-1]["code"]) == ("deny", "KEY_UNKNOWN")


async def test_revoked_watcher_is_cut_off_on_a_live_stream(private_orchestrator):
    orchestrator, private = private_orchestrator
    async with _orchestrator_channel(private, orchestrator.port) as channel:
        stream = orchestrator_pb2_grpc.OrchestratorStub(channel).WatchModels(
            orchestrator_pb2.WatchModelsRequest(crunch_id=CRUNCH)
        )
        assert {m.model_id for m in (await stream.read()).models} == {"counter"}
        _revoke_coordinator(private)
        started = time.monotonic()
        # Bound: registry re-read (1 s) + re-authorization interval (1 s).
        await assert_refused(stream.read(), grpc.StatusCode.PERMISSION_DENIED, ErrorCode.KEY_REVOKED)
        assert time.monotonic() - started < 3.5
    assert _audit(orchestrator)[-1]["code"] == "KEY_REVOKED"


def _report(client_layout, model_id, deployment_id, *, key=None, key_id=None):
    shared = orchestrator_pb2.FailureReport(deployment_id=deployment_id, reason="TEST").SerializeToString()
    coordinator = RawCoordinator.__new__(RawCoordinator)  # only its token helper is needed
    coordinator.layout, coordinator.model_id = client_layout, model_id
    coordinator.key = load_signing_key(client_layout.coordinator_identity)
    coordinator.key_id = pki.key_id_for(bytes(coordinator.key.verify_key))
    coordinator.cert_sha256 = tls.cert_sha256(tls.pem_to_der(client_layout.coordinator_cert.read_bytes()))
    overrides = {"key": key, "key_id": key_id} if key else {}
    body = model_id_field(model_id) + shared
    return body, coordinator.token(body, rpc=REPORT_RPC, **overrides)


async def _send_report(channel, body, token):
    stub = channel.unary_unary(REPORT_RPC, response_deserializer=orchestrator_pb2.FailureReportAck.FromString)
    metadata = ((TOKEN_KEY, token),) if token else ()
    return await stub(body, metadata=metadata, timeout=10)


async def test_spoofed_failure_reports_are_refused_and_stop_nothing(private_orchestrator):
    from nacl.signing import SigningKey

    orchestrator, private = private_orchestrator
    deployment = orchestrator.board.get("counter").deployment_id
    body, token = _report(private, "counter", deployment)
    _, rogue_token = _report(private, "counter", deployment, key=SigningKey.generate(), key_id="krogue")
    runner_creds = grpc.ssl_channel_credentials(
        private.ca_cert.read_bytes(), private.runner_key("counter").read_bytes(), private.runner_cert("counter").read_bytes()
    )
    async with _orchestrator_channel(private, orchestrator.port) as channel:
        await assert_refused(_send_report(channel, body, None), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_MISSING)
        assert _audit(orchestrator)[-1]["code"] == "TOKEN_MISSING"
        await assert_refused(_send_report(channel, body, rogue_token), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.KEY_UNKNOWN)
        assert _audit(orchestrator)[-1]["code"] == "KEY_UNKNOWN"
    async with _orchestrator_channel(private, orchestrator.port, runner_creds) as channel:
        await assert_refused(_send_report(channel, body, token), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.PEER_UNAUTHENTICATED)
    assert orchestrator.board.get("counter").state == orchestrator_pb2.MODEL_STATE_RUNNING

    # The genuine coordinator's report stops the model, once.
    async with _orchestrator_channel(private, orchestrator.port) as channel:
        assert (await _send_report(channel, body, token)).stopped is True
        await assert_refused(_send_report(channel, body, token), grpc.StatusCode.PERMISSION_DENIED, ErrorCode.TOKEN_REPLAYED)
    assert orchestrator.board.get("counter").state == orchestrator_pb2.MODEL_STATE_STOPPED
    assert [e["code"] for e in _audit(orchestrator)[-3:]] == ["OK", "FAILURE_REPORTED", "TOKEN_REPLAYED"]


# -- runner identity, checked by the client before any request ----------------------------


class ImpostorOrchestrator(LocalOrchestrator):
    """Relays, for the counter model, a delegation its cruncher made for another TLS key.

    This is what a compromised CA looks like from the client: a runner holding a valid
    certificate for the model that the model's cruncher never vouched for.
    """

    def _sign_delegation(self, info, cert):
        if info.model_id != "counter":
            return super()._sign_delegation(info, cert)
        other_cert, _ = pki.issue_certificate(
            pki.load_certificate(self.layout.ca_cert),
            pki.load_private_key(self.layout.ca_key),
            PeerIdentity.make(CRUNCH, Role.RUNNER, "counter"),
        )
        return super()._sign_delegation(info, other_cert)


@pytest.mark.parametrize("attack", ["undelegated-tls-key", "unregistered-signer"])
async def test_runner_identity_failure_blames_that_model_only_and_sends_it_nothing(layout, tmp_path, attack):
    private = _copy_layout(layout, tmp_path)
    if attack == "unregistered-signer":  # the counter's delegation is signed by a key the registry does not know
        pki.write_private_key(private.cruncher_identity("alice"), pki.generate_identity_key())
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    for model_id in ("counter", "async-model"):
        (submissions / model_id).symlink_to(MODELS / "submissions" / model_id)
    orchestrator_class = ImpostorOrchestrator if attack == "undelegated-tls-key" else LocalOrchestrator
    orchestrator = orchestrator_class(
        LocalOrchestratorSettings(  # a runner per model: only the counter's runner is the impostor
            crunch_id=CRUNCH, submissions=submissions, pki_dir=private.root, base_paths=[BASE_PATH], models_per_node=1
        )
    )
    port = await orchestrator.start()
    # The coordinator trusts the registry of the real PKI, not anything the orchestrator says.
    client = DynamicSubclassModelConcurrentRunner(
        timeout=5, crunch_id=CRUNCH, host="127.0.0.1", port=port, base_classname="sr_testgame.base.GameBase",
        security=CoordinatorSecurity.from_pki_dir(private.root),
    )
    try:
        await client.init()
        arguments, _ = encode_arguments(["hello"], {})
        results = by_id(await client.call("echo", arguments))
        expected = ErrorCode.DELEGATION_KEY_MISMATCH if attack == "undelegated-tls-key" else ErrorCode.DELEGATION_BAD_SIGNATURE
        assert results["counter"].status is CallStatus.FAILURE and results["counter"].reason == expected
        assert results["async-model"].status is CallStatus.SUCCESS and results["async-model"].output == {"echoed": "hello"}
        # Not one request reached the rejected runner: its audit log is empty.
        assert (orchestrator.settings.audit_folder / "runner-counter.jsonl").read_text() == ""
        assert (orchestrator.settings.audit_folder / "runner-async-model.jsonl").read_text() != ""
    finally:
        await client.close()
        await orchestrator.stop()


# -- rotation ----------------------------------------------------------------------------


async def test_runner_serves_a_renewed_certificate_without_restart(layout, tmp_path):
    from conftest import RunnerProcess

    private = _copy_layout(layout, tmp_path)
    runner = RunnerProcess(private, "counter")
    try:
        files = tls.TlsFiles(private.coordinator_cert, private.coordinator_key, private.ca_cert)
        name = PeerIdentity.make(CRUNCH, Role.RUNNER, "counter").tls_server_name
        before = await asyncio.to_thread(tls.fetch_server_certificate, "127.0.0.1", runner.port, files, name)
        pki.renew(private, days=2)
        after = await asyncio.to_thread(tls.fetch_server_certificate, "127.0.0.1", runner.port, files, name)
        assert after != before and after == tls.pem_to_der(private.runner_cert("counter").read_bytes())
        # The renewed coordinator certificate works too: a new client is served by the same process.
        client = await _ready(private, runner)
        assert (await client.call("echo", "rotated")).status == OK
        assert runner.proc.poll() is None
        await client.close()
    finally:
        runner.stop()
