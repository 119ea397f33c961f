"""The node-level FanOut RPC: one request and one token check for every model a runner hosts."""

from __future__ import annotations

import os
import shutil
import time

import grpc
import pytest

from secure_runner import codec, pki
from secure_runner.errors import ErrorCode
from secure_runner.smp.token import model_id_field
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import runner_pb2

from conftest import MODELS, RawCoordinator, RunnerProcess, assert_refused, by_id, write_submission

FANOUT_RPC = "/secure_runner.v1.ModelRunner/FanOut"
NODE = "node-a"
OK = runner_pb2.CALL_STATUS_SUCCESS
FAILURE = runner_pb2.CALL_STATUS_FAILURE
TIMEOUT = runner_pb2.CALL_STATUS_TIMEOUT


@pytest.fixture(scope="module")
def node(layout, tmp_path_factory):
    """One runner process hosting three models, each in its own worker."""
    tmp = tmp_path_factory.mktemp("node")
    private = pki.PkiLayout(shutil.copytree(layout.root, tmp / "pki"))
    pki.issue_runner_certificate(private, NODE)
    sleeper = write_submission(tmp, "sleeper", {"echo": "def echo(self, value):\n        time.sleep(value)\n        return value"}, imports="import time")
    runner = RunnerProcess(
        private, "counter", None,
        "--model", f"async-model={MODELS / 'submissions' / 'async-model'}",
        "--model", f"two-candidates={sleeper}",  # a registered model id, hosting the sleeper
        "--node-id", NODE,
    )
    yield private, runner
    runner.stop()


@pytest.fixture
async def client(node):
    private, runner = node
    coordinator = RawCoordinator(private, runner.address, NODE)
    for model_id in ("counter", "async-model", "two-candidates"):
        coordinator.model_id = model_id
        assert (await coordinator.setup()).status == OK
    coordinator.model_id = NODE
    yield coordinator
    await coordinator.close()


def fan_out_body(model_ids, method, *args, per_model=None) -> bytes:
    arguments, _ = codec.encode_arguments(list(args), {})
    request = runner_pb2.FanOutRequest(model_ids=model_ids, method=method, arguments=arguments)
    for model_id, values in (per_model or {}).items():
        request.per_model.add(model_id=model_id, arguments=codec.encode_arguments(list(values), {})[0])
    return model_id_field(NODE) + request.SerializeToString()


async def fan_out(client, body, method, audience, timeout=10.0, token=None):
    stream = client.channel.unary_stream(FANOUT_RPC, response_deserializer=runner_pb2.FanOutResults.FromString)
    token = token or client.token(body, rpc=FANOUT_RPC, method=method, audience=audience)
    arrived = []
    started = time.monotonic()
    async for batch in stream(body, metadata=((TOKEN_KEY, token),), timeout=timeout):
        arrived += [(result.model_id, result.response, time.monotonic() - started) for result in batch.results]
    return arrived


async def _count(client, model_id) -> int:
    (_, response, _), = await fan_out(client, fan_out_body([model_id], "count"), "count", [model_id])
    return codec.from_variant(response.output)


async def test_results_stream_back_as_each_model_finishes(client):
    models = ["counter", "async-model", "two-candidates"]
    body = fan_out_body(models, "echo", 0.8, per_model={"counter": ["first"], "async-model": ["second"]})
    arrived = await fan_out(client, body, "echo", models)
    by_model = {model_id: (response, at) for model_id, response, at in arrived}
    assert set(by_model) == set(models)
    assert codec.from_variant(by_model["counter"][0].output) == "first"
    assert codec.from_variant(by_model["async-model"][0].output) == {"echoed": "second"}
    assert codec.from_variant(by_model["two-candidates"][0].output) == 0.8
    # The fast models' results came first, without waiting for the slow one.
    assert arrived[-1][0] == "two-candidates"
    assert max(by_model["counter"][1], by_model["async-model"][1]) < by_model["two-candidates"][1] - 0.3


async def test_each_model_gets_its_own_deadline_and_failure(client):
    models = ["counter", "two-candidates", "not-here"]
    body = fan_out_body(models, "echo", 30, per_model={"counter": ["quick"]})
    arrived = {m: r for m, r, _ in await fan_out(client, body, "echo", models, timeout=1.0)}
    assert arrived["counter"].status == OK
    assert (arrived["two-candidates"].status, arrived["two-candidates"].error.code) == (TIMEOUT, ErrorCode.MODEL_TIMEOUT)
    assert (arrived["not-here"].status, arrived["not-here"].error.code) == (FAILURE, ErrorCode.MODEL_UNKNOWN)


async def test_undeclared_method_fails_per_model_and_reaches_no_model(client):
    before = await _count(client, "counter")
    models = ["counter", "async-model"]
    arrived = await fan_out(client, fan_out_body(models, "secret_method"), "secret_method", models)
    assert {(m, r.error.code) for m, r, _ in arrived} == {(m, ErrorCode.METHOD_NOT_ALLOWED) for m in models}
    assert await _count(client, "counter") == before


async def test_a_model_outside_the_token_audience_refuses_the_whole_fan_out(client, node):
    _, runner = node
    before = await _count(client, "counter")
    body = fan_out_body(["counter", "async-model"], "echo", 1)
    await assert_refused(
        fan_out(client, body, "echo", ["counter"]), grpc.StatusCode.PERMISSION_DENIED,
        ErrorCode.TOKEN_WRONG_AUDIENCE, audited_by=runner,
    )
    assert await _count(client, "counter") == before


async def test_a_fan_out_token_is_used_once(client, node):
    _, runner = node
    body = fan_out_body(["counter"], "echo", 1)
    token = client.token(body, rpc=FANOUT_RPC, method="echo", audience=["counter"])
    assert len(await fan_out(client, body, "echo", None, token=token)) == 1
    await assert_refused(
        fan_out(client, body, "echo", None, token=token), grpc.StatusCode.PERMISSION_DENIED,
        ErrorCode.TOKEN_REPLAYED, audited_by=runner,
    )


async def test_a_fan_out_for_another_node_is_refused(client):
    request = runner_pb2.FanOutRequest(model_ids=["counter"], method="count")
    body = model_id_field("node-b") + request.SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fan_out(client, body, "count", ["counter"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# -- the client and the orchestrator over model nodes ----------------------------------------


def test_by_default_the_orchestrator_packs_one_node_per_cpu_core():
    from secure_runner.orchestrator.local import pack

    model_ids = [f"model-{i}" for i in range(50)]
    allowed = os.sched_getaffinity(0)
    cores = len(allowed)
    nodes = pack(model_ids, None)
    assert pack(model_ids, 0) == nodes and len(nodes) <= cores  # 2 nodes of 25 on 2 cores
    assert [m for node in nodes.values() for m in node] == model_ids
    assert max(map(len, nodes.values())) == -(-50 // cores)  # ceil(models / cores) per node
    assert pack(model_ids, 1) == {m: [m] for m in model_ids}  # a runner per model, named after it
    assert pack(["alone"], None) == {"alone": ["alone"]}
    os.sched_setaffinity(0, {min(allowed)})  # a cpuset or taskset of one CPU: one node
    try:
        assert pack(model_ids, None) == {"node-0": model_ids}
    finally:
        os.sched_setaffinity(0, allowed)


async def test_client_reaches_packed_models_with_one_fan_out_per_node(layout, tmp_path):
    from secure_runner import CallStatus
    from secure_runner.orchestrator.local import LocalOrchestrator, LocalOrchestratorSettings

    from conftest import BASE_PATH, CRUNCH, make_client

    private = pki.PkiLayout(shutil.copytree(layout.root, tmp_path / "pki"))
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    for model_id in ("async-model", "counter", "two-candidates"):
        (submissions / model_id).symlink_to(MODELS / "submissions" / ("counter" if model_id == "two-candidates" else model_id))
    orchestrator = LocalOrchestrator(LocalOrchestratorSettings(
        crunch_id=CRUNCH, submissions=submissions, pki_dir=private.root, base_paths=[BASE_PATH], models_per_node=2,
    ))
    port = await orchestrator.start()
    client = make_client(private, port)
    try:
        await client.init()
        assert {orchestrator.board.get(m).node_id for m in ("async-model", "counter")} == {"node-0"}
        assert orchestrator.board.get("two-candidates").node_id == "node-1"
        arguments, _ = codec.encode_arguments(["tick"], {})
        for _ in range(3):
            results = by_id(await client.call("echo", arguments))
            assert {m: r.status for m, r in results.items()} == dict.fromkeys(results, CallStatus.SUCCESS)
            assert results["async-model"].output == {"echoed": "tick"} and results["counter"].output == "tick"
            assert all(r.latency_us > 0 for r in results.values())
        audit = orchestrator.settings.audit_folder
        node_rpcs = [line for line in (audit / "runner-node-0.jsonl").read_text().splitlines() if '"allow"' in line]
        assert sum("FanOut" in line for line in node_rpcs) == 3  # one per round for both models
        assert not any("ModelRunner/Call" in line for line in node_rpcs)
        single = (audit / "runner-node-1.jsonl").read_text()
        assert single.count("ModelRunner/Call") == 3 and "FanOut" not in single
        # A model fault on a node is that model's alone.
        per_model = lambda identity: codec.encode_arguments(["boom" if identity.model_id == "counter" else "ok"], {})[0]
        results = by_id(await client.call("fail", per_model))
        assert results["counter"].reason == ErrorCode.MODEL_RAISED and results["counter"].message == "RuntimeError: boom"
    finally:
        await client.close()
        await orchestrator.stop()
