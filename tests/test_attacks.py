"""The Secure Model Protocol attack suite, part 2: certificates, revocation, replay, floods, reports.

Real runners and a real orchestrator over TLS. Each refused call asserts the
gRPC status and reason code, that the model never ran (it counts its calls),
and the audit line the server wrote. Refusals made by the TLS layer itself
(no certificate, wrong CA, expired certificate) never reach the application,
so they carry no reason code and no audit line; grpc logs the handshake error.
"""

from __future__ import annotations

import asyncio
import collections
import json
import selectors
import shutil
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from nacl.signing import SigningKey

from secure_runner import CallStatus, CoordinatorSecurity, DynamicSubclassModelConcurrentRunner, pki
from secure_runner.codec import encode_arguments
from secure_runner.pki import load_signing_key
from secure_runner.errors import ErrorCode
from secure_runner.orchestrator.credentials import EmbeddedCredentials
from secure_runner.orchestrator.local import LocalOrchestrator, LocalOrchestratorSettings
from secure_runner.orchestrator.service import REPORT_RPC, WATCH_RPC
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.token import issue_call_token, model_id_field
from secure_runner.transport import tls
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import orchestrator_pb2, runner_pb2, values_pb2

from conftest import (
    BASE_PATH,
    CALL_RPC,
    CRUNCH,
    MODELS,
    RawCoordinator,
    assert_refused,
    by_id,
    credentials,
    eventually,
    forge_certificate,
    idle_connections,
    open_file_limit,
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

    # A token dated inside the clock skew (5 s ahead) is refused now: had it been accepted, the
    # restarted runner (start second <= its iat) would accept it once more.
    ahead_body = client.call_body("echo", "ahead")
    ahead = ((TOKEN_KEY, client.token(ahead_body, method="echo", now=int(time.time()) + 5)),)
    await assert_refused(
        client.raw(CALL_RPC, ahead_body, ahead), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_NOT_YET_VALID,
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


FANOUT_RPC = "/secure_runner.v1.ModelRunner/FanOut"


@pytest.mark.parametrize("rpc", [CALL_RPC, FANOUT_RPC], ids=["Call", "FanOut"])
async def test_a_token_for_one_runner_is_refused_by_another_runner_of_the_same_model(layout, tmp_path, fresh_runner, rpc):
    """Two runners host model "counter" with their own TLS keys (say an old and a new deployment).
    A token captured on its way to one is refused by the other (SMP-9a), and the model never runs."""
    first = fresh_runner("counter")
    private = _copy_layout(layout, tmp_path)
    pki.issue_runner_certificate(private, "counter")  # the second runner's own key
    second = fresh_runner(
        "counter", None, "--cert", str(private.runner_cert("counter")), "--key", str(private.runner_key("counter"))
    )
    to_first = await _ready(layout, first)
    to_second = await _ready(private, second)
    if rpc == CALL_RPC:
        body = to_first.call_body("echo", "captured")
        token = to_first.token(body, method="echo")
        call = to_second.raw(CALL_RPC, body, ((TOKEN_KEY, token),))
    else:  # a single-model runner is a node named after its model
        arguments, _ = encode_arguments(["captured"], {})
        body = model_id_field("counter") + runner_pb2.FanOutRequest(
            model_ids=["counter"], method="echo", arguments=arguments
        ).SerializeToString()
        token = to_first.token(body, rpc=FANOUT_RPC, method="echo")
        stream = to_second.channel.unary_stream(FANOUT_RPC, response_deserializer=runner_pb2.FanOutResults.FromString)
        call = stream(body, metadata=((TOKEN_KEY, token),)).read()
    await assert_refused(call, grpc.StatusCode.PERMISSION_DENIED, ErrorCode.TOKEN_WRONG_DESTINATION, audited_by=second)
    assert await to_second.count() == 0
    await to_first.close()
    await to_second.close()


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
    """2,000 idle and 50 half-open TLS connections against a runner started at the common 1,024-file limit."""
    with open_file_limit(1024):
        runner = fresh_runner("counter", None, "--handshake-timeout-ms", "3000")
    owner = await _ready(layout, runner)
    with idle_connections(runner.port, idle=2000, half_open_tls=50) as held:
        late = RawCoordinator(layout, runner.address, "counter")  # a new connection, made during the flood
        assert (await late.call("echo", "served", timeout=2)).status == OK
        await late.close()
        closed = 0
        with selectors.DefaultSelector() as waiting:
            for sock in held:
                waiting.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + 10
            while closed < len(held) and time.monotonic() < deadline:
                for key, _ in waiting.select(deadline - time.monotonic()):
                    waiting.unregister(key.fileobj)
                    closed += 1
        assert closed == len(held)  # each never-finished handshake was closed by the server
    assert (await owner.call("echo", "still served", timeout=2)).status == OK
    await owner.close()


async def test_stream_flood_is_refused_and_the_runner_keeps_serving(layout, fresh_runner):
    """4 connections from a runner's certificate, each with 4 big, 4 gzip-bombed and 300 small requests.

    The runner reads no body before the peer gate refused the certificate: its memory
    stays flat; the owner's calls keep succeeding; the refusals are audited as counted lines.
    """
    runner = fresh_runner("counter")
    owner = await _ready(layout, runner)
    before = await owner.count()
    rss_before = _memory_kib(runner.proc.pid, "VmRSS")
    name = PeerIdentity.make(CRUNCH, Role.RUNNER, "counter").tls_server_name
    options = [(k, -1 if k == "grpc.max_send_message_length" else v) for k, v in tls.channel_options(name)]
    runner_files = tls.TlsFiles(layout.runner_cert("counter"), layout.runner_key("counter"), layout.ca_cert)
    big = model_id_field("counter") + bytes(16 << 20)
    small = model_id_field("counter") + bytes(64)
    channels = [
        grpc.aio.secure_channel(runner.address, tls.channel_credentials(runner_files), options=options)
        for _ in range(4)
    ]

    async def send(channel, body, compression=None):
        try:
            await channel.unary_unary(CALL_RPC)(body, timeout=30, compression=compression)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    flood = asyncio.gather(*(
        send(channel, body, compression)
        for channel in channels
        for body, compression, count in ((big, None, 4), (big, grpc.Compression.Gzip, 4), (small, None, 300))
        for _ in range(count)
    ))
    served = [(await owner.call("echo", i, timeout=5)).status for i in range(20)]
    codes = collections.Counter(await flood)
    for channel in channels:
        await channel.close()
    assert served == [OK] * 20
    assert await owner.count() == before + 20
    assert sum(codes.values()) == 4 * 308 and grpc.StatusCode.OK not in codes
    # Refused by the peer gate (audited), the gzip ones by grpc from their header, the rest by HTTP/2 limits.
    assert codes[grpc.StatusCode.UNAUTHENTICATED] > 0
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE}
    growth_mib = (_memory_kib(runner.proc.pid, "VmHWM") - rss_before) / 1024
    assert growth_mib < 32, f"the runner grew by {growth_mib:.0f} MiB"
    attacker = PeerIdentity.make(CRUNCH, Role.RUNNER, "counter").spiffe_id

    def refusals() -> list[dict]:
        return [e for e in runner.audit_entries() if e["who"] == attacker]

    def audited() -> int:
        return sum(int(e["what"].get("repeats", "1")) for e in refusals())

    # Every refusal is counted once its counting window ends (a background thread writes the
    # counted line: on a loaded machine that can be later than the window's second).
    await eventually(lambda: audited() >= codes[grpc.StatusCode.UNAUTHENTICATED], timeout=10,
                     what="every refusal the attacker saw counted in the audit log")
    assert {e["code"] for e in refusals()} == {ErrorCode.PEER_UNAUTHENTICATED}
    assert len(refusals()) < 20  # counted lines, not one per refusal
    # None counted twice (a request refused while still being sent may reach its sender as
    # UNAVAILABLE or, under load, UNIMPLEMENTED, so only the total bounds it from above).
    assert audited() <= sum(codes.values())
    await owner.close()


def _memory_kib(pid: int, field: str) -> int:
    """A process's VmRSS (resident now) or VmHWM (peak resident), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


async def test_metadata_flood_is_refused_before_the_model(coordinator_for_counter):
    client, _ = coordinator_for_counter
    before = await client.count()
    body = client.call_body("echo", 1)
    metadata = ((TOKEN_KEY, client.token(body, method="echo")), *((f"x-pad-{i}", "y" * 1000) for i in range(40)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.raw(CALL_RPC, body, metadata)
    assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    assert await client.count() == before


async def test_oversized_message_is_refused_before_the_model(layout, coordinator_for_counter):
    """Sent over a channel without the client's own send cap, so the runner is what refuses it (audited)."""
    client, runner = coordinator_for_counter
    before = await client.count()
    oversized = values_pb2.Argument(
        position=1, data=values_pb2.Variant(type=values_pb2.BYTES, value=b"x" * (tls.MAX_MESSAGE_BYTES + 1024))
    )
    body = model_id_field("counter") + runner_pb2.CallRequest(method="echo", arguments=[oversized]).SerializeToString()
    name = PeerIdentity.make(CRUNCH, Role.RUNNER, "counter").tls_server_name
    options = [(k, -1 if k == "grpc.max_send_message_length" else v) for k, v in tls.channel_options(name)]
    async with grpc.aio.secure_channel(runner.address, credentials(layout), options=options) as uncapped:
        call = uncapped.unary_unary(CALL_RPC)(body, metadata=((TOKEN_KEY, client.token(body, method="echo")),), timeout=30)
        await assert_refused(call, grpc.StatusCode.RESOURCE_EXHAUSTED, None)  # grpc's own answer: no reason code
    last = runner.audit_entries()[-1]
    assert (last["decision"], last["code"], last["what"]["rpc"]) == ("deny", ErrorCode.MESSAGE_TOO_LARGE, CALL_RPC)
    assert await client.count() == before


async def test_unknown_grpc_method_is_unimplemented(coordinator_for_counter):
    client, runner = coordinator_for_counter
    body = client.call_body("echo", 1)
    call = client.raw("/secure_runner.v1.ModelRunner/Exec", body, ((TOKEN_KEY, client.token(body)),))
    await assert_refused(call, grpc.StatusCode.UNIMPLEMENTED, ErrorCode.RPC_UNIMPLEMENTED, audited_by=runner)


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


def _orchestrator_token(layout, subject, rpc, shared=b"", *, key=None, key_id=None, cert_pem=None, crunch_id=CRUNCH):
    """A coordinator's token for an orchestrator call whose request is `model_id_field(subject) + shared`."""
    key = key or load_signing_key(layout.coordinator_identity)
    return issue_call_token(
        key,
        key_id=key_id or pki.key_id_for(bytes(key.verify_key)),
        crunch_id=crunch_id,
        audience=[subject],
        destinations=[tls.spki_sha256(tls.pem_to_der(layout.orchestrator_cert.read_bytes()))],
        rpc=rpc,
        method="",
        shared_body=shared,
        cert_sha256=tls.cert_sha256(tls.pem_to_der(cert_pem or layout.coordinator_cert.read_bytes())),
        now=int(time.time()),
    )


def _watch(channel, token=None, crunch_id=CRUNCH):
    """WatchModels by hand: the request is its crunch id field alone (the signed form)."""
    watch = channel.unary_stream(WATCH_RPC, response_deserializer=orchestrator_pb2.ModelList.FromString)
    return watch(model_id_field(crunch_id), metadata=((TOKEN_KEY, token),) if token else ())


async def test_watcher_with_unregistered_key_is_refused(private_orchestrator):
    orchestrator, private = private_orchestrator
    rogue = SigningKey.generate()
    rogue_id = pki.key_id_for(bytes(rogue.verify_key))
    cert, key = forge_certificate(private, uris=[f"spiffe://{CRUNCH}/coordinator/{rogue_id}"])
    token = _orchestrator_token(private, CRUNCH, WATCH_RPC, key=rogue, cert_pem=cert)
    async with _orchestrator_channel(private, orchestrator.port, forged_credentials(private, cert, key)) as channel:
        await assert_refused(_watch(channel, token).read(), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.KEY_UNKNOWN)
    assert (_audit(orchestrator)[-1]["decision"], _audit(orchestrator)[-1]["code"]) == ("deny", "KEY_UNKNOWN")


async def test_a_stolen_coordinator_certificate_alone_cannot_watch_the_model_list(private_orchestrator):
    """SMP-20 with a token: the certificate without the signing key reads nothing, and the request
    is judged before it is parsed (garbage gets the same refusal)."""
    orchestrator, private = private_orchestrator
    async with _orchestrator_channel(private, orchestrator.port) as channel:
        await assert_refused(_watch(channel).read(), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_MISSING)
        garbage = channel.unary_stream(WATCH_RPC, response_deserializer=orchestrator_pb2.ModelList.FromString)
        await assert_refused(garbage(b"\xff\xff\xff").read(), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_MISSING)
        # With the key: the same certificate watches.
        assert {m.model_id for m in (await _watch(channel, _orchestrator_token(private, CRUNCH, WATCH_RPC)).read()).models} == {"counter"}
    codes = [e["code"] for e in _audit(orchestrator)]
    assert codes[-1] == "OK" and "TOKEN_MISSING" in codes[-3:-1]  # a repeated refusal may be counted, not repeated


async def test_revoked_watcher_is_cut_off_on_a_live_stream(private_orchestrator):
    orchestrator, private = private_orchestrator
    async with _orchestrator_channel(private, orchestrator.port) as channel:
        stream = _watch(channel, _orchestrator_token(private, CRUNCH, WATCH_RPC))
        assert {m.model_id for m in (await stream.read()).models} == {"counter"}
        _revoke_coordinator(private)
        started = time.monotonic()
        # Bound: registry re-read (1 s) + re-authorization interval (1 s).
        await assert_refused(stream.read(), grpc.StatusCode.PERMISSION_DENIED, ErrorCode.KEY_REVOKED)
        assert time.monotonic() - started < 3.5
    assert _audit(orchestrator)[-1]["code"] == "KEY_REVOKED"


def _report(client_layout, model_id, deployment_id, *, key=None, key_id=None):
    shared = orchestrator_pb2.FailureReport(deployment_id=deployment_id, reason="TEST").SerializeToString()
    token = _orchestrator_token(client_layout, model_id, REPORT_RPC, shared, key=key, key_id=key_id)
    return model_id_field(model_id) + shared, token


async def _send_report(channel, body, token):
    stub = channel.unary_unary(REPORT_RPC, response_deserializer=orchestrator_pb2.FailureReportAck.FromString)
    metadata = ((TOKEN_KEY, token),) if token else ()
    return await stub(body, metadata=metadata, timeout=10)


async def test_spoofed_failure_reports_are_refused_and_stop_nothing(private_orchestrator):
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
        # Signed by a key the coordinator's certificate does not name (SMP-4a).
        await assert_refused(
            _send_report(channel, body, rogue_token), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_KID_MISMATCH
        )
        assert _audit(orchestrator)[-1]["code"] == "TOKEN_KID_MISMATCH"
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


class ImpostorCredentials(EmbeddedCredentials):
    """Relays, for the counter model, a delegation its cruncher made for another TLS key.

    This is what a compromised CA looks like from the client: a runner holding a valid
    certificate for the model that the model's cruncher never vouched for.
    """

    def delegation(self, info, cert):
        if info.model_id != "counter":
            return super().delegation(info, cert)
        other_cert, _ = pki.issue_certificate(
            pki.load_certificate(self._layout.ca_cert),
            pki.load_private_key(self._layout.ca_key),
            PeerIdentity.make(CRUNCH, Role.RUNNER, "counter"),
        )
        return super().delegation(info, other_cert)


class ImpostorOrchestrator(LocalOrchestrator):
    def __init__(self, settings):
        super().__init__(settings, credentials=ImpostorCredentials(pki.PkiLayout(settings.pki_dir), settings.crunch_id))


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
