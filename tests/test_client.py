"""The coordinator's client against a real orchestrator and real runners."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time

import grpc
import pytest

from secure_runner import CallStatus, CoordinatorSecurity, Fault, pki
from secure_runner.errors import ErrorCode, RequestError
from secure_runner.orchestrator.local import LocalOrchestrator, LocalOrchestratorSettings
from secure_runner.orchestrator.service import WATCH_RPC
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.token import issue_call_token, model_id_field
from secure_runner.transport import tls
from secure_runner.transport.status import TOKEN_KEY, reason_of
from secure_runner.v1 import orchestrator_pb2

from conftest import BASE_PATH, CRUNCH, MODELS, by_id, eventually, json_args, make_client



async def _stopped_by_report(orchestrator, model_id: str) -> None:
    await eventually(
        lambda: orchestrator.board.get(model_id).state == orchestrator_pb2.MODEL_STATE_STOPPED,
        timeout=5, what=f"{model_id} stopped by the failure report",
    )

@pytest.fixture(scope="module")
def orchestrator(layout, tmp_path_factory):
    # Its own copy of the PKI: an orchestrator issues runner certificates into its folder.
    private = shutil.copytree(layout.root, tmp_path_factory.mktemp("orchestrator") / "pki")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "secure_runner.cli", "orchestrator",
            "--crunch", CRUNCH,
            "--submissions", str(MODELS / "submissions"),
            "--pki", str(private),
            "--base-path", str(BASE_PATH),
            "--log-level", "WARNING",
            "--stop-models-on-exit",  # its runners end with the module
            "--port", "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("READY "), line
    yield int(line.split()[1])
    proc.terminate()
    proc.wait(15)


@pytest.fixture
async def own_orchestrator(layout, tmp_path):
    """An in-process orchestrator of the test's own (disconnect reports stop its models)."""
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    for model_id in ("counter", "async-model"):
        (submissions / model_id).symlink_to(MODELS / "submissions" / model_id)
    orchestrator = LocalOrchestrator(
        LocalOrchestratorSettings(
            crunch_id=CRUNCH,
            submissions=submissions,
            pki_dir=shutil.copytree(layout.root, tmp_path / "pki"),  # it issues runner certificates there
            base_paths=[BASE_PATH],
            models_per_node=1,  # its tests stop or kill one model's runner
        )
    )
    await orchestrator.start()
    yield orchestrator
    await orchestrator.stop()


@pytest.fixture
async def client(layout, orchestrator):
    runner = make_client(layout, orchestrator)
    await runner.init()
    yield runner
    await runner.close()


async def test_fan_out_returns_one_result_per_model_with_identity(client):
    results = by_id(await client.call("echo", json_args({"price": 101.5})))
    assert set(results) == {"counter", "async-model", "no-candidate", "two-candidates"}

    counter = results["counter"]
    assert counter.status is CallStatus.SUCCESS and counter.output == {"price": 101.5}
    assert (counter.model_name, counter.cruncher_id, counter.cruncher_name) == ("Counter", "alice", "Alice")
    assert counter.deployment_id.startswith("counter-")
    assert counter.latency_us > 0
    # Reference-client names still work.
    assert counter.result == counter.output and counter.exec_time_us == counter.latency_us

    assert results["async-model"].output == {"echoed": {"price": 101.5}}
    assert results["no-candidate"].status is CallStatus.FAILURE
    assert results["no-candidate"].reason == ErrorCode.SETUP_NO_CANDIDATE
    assert results["two-candidates"].reason == ErrorCode.SETUP_MANY_CANDIDATES


async def test_subset_of_models(client):
    results = await client.call("echo", json_args(1), models=["async-model"])
    assert [m.model_id for m in results] == ["async-model"]
    assert await client.call("echo", json_args(1), models=[]) == {}
    # An id that is not running still gets its one result, blaming no model.
    results = by_id(await client.call("echo", json_args(1), models=["counter", "nobody"]))
    assert results["counter"].status is CallStatus.SUCCESS
    assert (results["nobody"].status, results["nobody"].reason) == (CallStatus.FAILURE, ErrorCode.MODEL_UNAVAILABLE)
    assert results["nobody"].fault is Fault.INFRASTRUCTURE


async def test_undeclared_method_is_the_coordinators_error(client):
    before = await client.call("count", models=["counter"])
    with pytest.raises(RequestError) as err:
        await client.call("secret_method")
    assert err.value.code == ErrorCode.METHOD_NOT_ALLOWED
    after = await client.call("count", models=["counter"])
    assert list(after.values())[0].output == list(before.values())[0].output
    assert {m.model_id for m in client.models} >= {"counter", "async-model"}


async def test_timeouts_disconnect_a_model_after_the_limit(layout, own_orchestrator):
    runner = make_client(layout, own_orchestrator.port, timeout=0.5, max_consecutive_timeouts=2)
    await runner.init()
    for attempt in (1, 2):
        assert await runner.ready(10)  # the worker restarted after the first timeout
        results = await runner.call("hang", json_args(3600), models=["counter"])
        (result,) = results.values()
        assert result.status is CallStatus.TIMEOUT
        assert result.reason == ErrorCode.MODEL_TIMEOUT
        connected = {m.model_id for m in runner.models}
        assert ("counter" in connected) is (attempt == 1)
    await _stopped_by_report(own_orchestrator, "counter")
    await runner.close()


async def test_one_timeout_then_success_keeps_the_model(layout, orchestrator):
    runner = make_client(layout, orchestrator, timeout=0.5, max_consecutive_timeouts=2)
    await runner.init()
    for _ in range(3):
        (timed_out,) = (await runner.call("hang", json_args(3600), models=["async-model"])).values()
        assert timed_out.status is CallStatus.TIMEOUT
        # Its worker is being replaced: skipped, not counted.
        (skipped,) = (await runner.call("echo", json_args(1), models=["async-model"])).values()
        assert (skipped.status, skipped.reason, skipped.latency_us) == (CallStatus.FAILURE, ErrorCode.COOLING_DOWN, 0)
        assert await runner.ready(10)
        runner.timeout = 10
        (ok,) = (await runner.call("echo", json_args(1), models=["async-model"])).values()
        assert ok.status is CallStatus.SUCCESS
        runner.timeout = 0.5
    assert "async-model" in {m.model_id for m in runner.models}
    await runner.close()


async def test_failures_disconnect_a_model_after_the_limit(layout, own_orchestrator):
    runner = make_client(layout, own_orchestrator.port, max_consecutive_failures=2)
    await runner.init()
    (first,) = (await runner.call("fail", json_args("boom"), models=["counter"])).values()
    assert first.status is CallStatus.FAILURE and first.reason == ErrorCode.MODEL_RAISED
    assert first.message == "RuntimeError: boom"
    assert "counter" in {m.model_id for m in runner.models}
    await runner.call("fail", json_args("boom"), models=["counter"])
    assert "counter" not in {m.model_id for m in runner.models}
    await _stopped_by_report(own_orchestrator, "counter")
    assert own_orchestrator.board.get("async-model").state == orchestrator_pb2.MODEL_STATE_RUNNING
    # Stopped on purpose: the orchestrator does not restart it.
    await asyncio.sleep(1.0)
    assert own_orchestrator.board.get("counter").state == orchestrator_pb2.MODEL_STATE_STOPPED
    assert own_orchestrator.runner_process("counter").returncode is not None
    await runner.close()


async def _watch(layout, port, cert, key, crunch_id=CRUNCH, *, signed=True):
    """WatchModels by hand, over `cert`; `signed`: with the coordinator's token for that certificate."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=layout.ca_cert.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )
    name = PeerIdentity.make(CRUNCH, Role.ORCHESTRATOR, "orchestrator").tls_server_name
    signing_key = pki.load_signing_key(layout.coordinator_identity)
    token = issue_call_token(
        signing_key, key_id=pki.key_id_for(bytes(signing_key.verify_key)), crunch_id=CRUNCH, audience=[crunch_id],
        destinations=[tls.spki_sha256(tls.pem_to_der(layout.orchestrator_cert.read_bytes()))], rpc=WATCH_RPC,
        method="", shared_body=b"", cert_sha256=tls.cert_sha256(tls.pem_to_der(cert.read_bytes())), now=int(time.time()),
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=tls.channel_options(name)) as channel:
        watch = channel.unary_stream(WATCH_RPC, response_deserializer=orchestrator_pb2.ModelList.FromString)
        metadata = ((TOKEN_KEY, token),) if signed else ()
        return await watch(model_id_field(crunch_id), metadata=metadata, timeout=10).read()


async def test_registered_coordinator_sees_the_model_list(layout, orchestrator):
    snapshot = await _watch(layout, orchestrator, layout.coordinator_cert, layout.coordinator_key)
    assert {m.model_id for m in snapshot.models} == {"counter", "async-model", "no-candidate", "two-candidates"}
    assert all(m.address.startswith("127.0.0.1:") for m in snapshot.models)


async def test_a_coordinator_certificate_without_its_signing_key_cannot_watch_the_model_list(layout, orchestrator):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _watch(layout, orchestrator, layout.coordinator_cert, layout.coordinator_key, signed=False)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(err.value) == ErrorCode.TOKEN_MISSING


async def test_a_runner_certificate_cannot_watch_the_model_list(layout, orchestrator):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _watch(layout, orchestrator, layout.runner_cert("counter"), layout.runner_key("counter"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(err.value) == ErrorCode.PEER_UNAUTHENTICATED


async def test_watching_another_crunch_is_refused(layout, orchestrator):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _watch(layout, orchestrator, layout.coordinator_cert, layout.coordinator_key, crunch_id="other")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err.value) == ErrorCode.WATCHER_NOT_AUTHORIZED


async def test_coordinator_of_another_ca_cannot_connect(layout, other_layout, orchestrator):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _watch(layout, orchestrator, other_layout.coordinator_cert, other_layout.coordinator_key)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_sync_applies_live_membership_changes(layout, own_orchestrator):
    """A runner that dies leaves the client's model list, the others keep answering, and its restart joins."""
    orchestrator = own_orchestrator
    port = orchestrator.port
    runner = make_client(layout, port)
    await runner.init()
    sync = asyncio.create_task(runner.sync())
    try:
        assert {m.model_id for m in runner.models} == {"counter", "async-model"}
        before = {m.model_id: m.deployment_id for m in runner.models}
        orchestrator.runner_process("counter").kill()
        for _ in range(500):
            if {m.model_id for m in runner.models} == {"async-model"}:
                break
            await asyncio.sleep(0.01)
        assert {m.model_id for m in runner.models} == {"async-model"}
        assert orchestrator.board.get("counter").state == orchestrator_pb2.MODEL_STATE_RECOVERING
        results = await runner.call("echo", json_args(7))  # the recovering model is down, not gone
        assert {m.model_id: (r.status, r.reason) for m, r in results.items()} == {
            "async-model": (CallStatus.SUCCESS, ""), "counter": (CallStatus.FAILURE, ErrorCode.MODEL_RECOVERING)}
        # The orchestrator restarts it as a new deployment, and the client connects to that.
        for _ in range(1000):
            if {m.model_id for m in runner.models} == {"counter", "async-model"} and await runner.ready(0):
                break
            await asyncio.sleep(0.01)
        results = {m.model_id: (m.deployment_id, r.status) for m, r in (await runner.call("echo", json_args(8))).items()}
        assert results["async-model"] == (before["async-model"], CallStatus.SUCCESS)
        assert results["counter"][1] is CallStatus.SUCCESS and results["counter"][0] != before["counter"]
    finally:
        sync.cancel()
        await asyncio.gather(sync, return_exceptions=True)
        await runner.close()


def test_a_fault_already_reported_is_not_counted_again():
    """The runner's MODEL_RESTARTING (tests/test_sandbox.py shows it sent) blames no model, and cools it down."""
    from secure_runner.client.results import RESTARTING_FAULTS, fault_of

    assert fault_of(CallStatus.FAILURE, ErrorCode.MODEL_RESTARTING) is Fault.INFRASTRUCTURE
    assert fault_of(CallStatus.FAILURE, ErrorCode.WORKER_CRASHED) is Fault.MODEL
    assert ErrorCode.MODEL_RESTARTING in RESTARTING_FAULTS


async def test_result_names_come_from_the_registry_not_the_orchestrator(layout, own_orchestrator):
    """The orchestrator says where a model runs; who it is (name, cruncher) is the registry's word."""
    for model_id in ("counter", "async-model"):
        info = orchestrator_pb2.ModelInfo()
        info.CopyFrom(own_orchestrator.board.get(model_id))
        info.model_name, info.cruncher_id, info.cruncher_name = "Impostor", "mallory", "Mallory"
        await own_orchestrator.board.put(info)
    runner = make_client(layout, own_orchestrator.port)
    try:
        await runner.init()
        results = by_id(await runner.call("echo", json_args(1)))
        assert {(r.model_name, r.cruncher_id, r.cruncher_name) for r in results.values()} == {
            ("Counter", "alice", "Alice"), ("Async", "bob", "Bob")
        }
    finally:
        await runner.close()


async def test_a_renewed_coordinator_certificate_serves_new_channels_and_old_ones(layout, own_orchestrator, tmp_path):
    """Certificate renewal under a running coordinator: each channel's tokens bind the certificate
    that channel presents, so a channel opened after the renewal works as well as the ones before it."""
    private = pki.PkiLayout(shutil.copytree(layout.root, tmp_path / "coordinator-pki"))
    runner = make_client(layout, own_orchestrator.port, security=CoordinatorSecurity.from_pki_dir(private.root))
    sync = None
    try:
        await runner.init()
        sync = asyncio.create_task(runner.sync())
        assert all(r.status is CallStatus.SUCCESS for r in (await runner.call("echo", json_args(1))).values())
        pki.renew(private, new_keys=True)  # the coordinator's certificate and TLS key, renewed on disk
        before = {m.model_id: m.deployment_id for m in runner.models}
        own_orchestrator.runner_process("counter").kill()  # its new deployment means a new channel
        for _ in range(1500):
            renewed = {m.model_id: m.deployment_id for m in runner.models}
            if renewed.get("counter") not in (None, before["counter"]) and await runner.ready(0):
                break
            await asyncio.sleep(0.01)
        results = by_id(await runner.call("echo", json_args(2)))
        assert {model_id: (r.status, r.reason) for model_id, r in results.items()} == {
            "counter": (CallStatus.SUCCESS, ""), "async-model": (CallStatus.SUCCESS, "")
        }
        assert results["counter"].deployment_id != before["counter"]
    finally:
        if sync is not None:
            sync.cancel()
            await asyncio.gather(sync, return_exceptions=True)
        await runner.close()
