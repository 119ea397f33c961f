"""The node-level FanOut RPC: one request and one token check for every model a runner hosts."""

from __future__ import annotations

import asyncio
import shutil
import time

import grpc
import pytest

from secure_runner import codec, pki
from secure_runner.errors import ErrorCode
from secure_runner.smp.token import model_id_field
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import runner_pb2

from conftest import MODELS, RawCoordinator, RunnerProcess, assert_refused, write_submission

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
    stream = client.channel.unary_stream(FANOUT_RPC, response_deserializer=runner_pb2.FanOutResult.FromString)
    token = token or client.token(body, rpc=FANOUT_RPC, method=method, audience=audience)
    arrived = []
    started = time.monotonic()
    async for result in stream(body, metadata=((TOKEN_KEY, token),), timeout=timeout):
        arrived.append((result.model_id, result.response, time.monotonic() - started))
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
