"""Setup, deadlines and restarts of real worker subprocesses behind a real runner."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secure_runner import codec
from secure_runner.errors import ErrorCode
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import runner_pb2

from conftest import CALL_RPC, MODELS, RawCoordinator, write_submission

OK = runner_pb2.CALL_STATUS_SUCCESS
FAILURE = runner_pb2.CALL_STATUS_FAILURE
TIMEOUT = runner_pb2.CALL_STATUS_TIMEOUT
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_setup_with_no_candidate_class_is_a_clear_error(layout, runners):
    client = RawCoordinator(layout, runners["no-candidate"].address, "no-candidate")
    response = await client.setup()
    assert response.status == FAILURE
    assert response.error.code == ErrorCode.SETUP_NO_CANDIDATE
    assert "sr_testgame.base.GameBase" in response.error.message
    await client.close()


async def test_setup_with_two_candidate_classes_names_both(layout, runners):
    client = RawCoordinator(layout, runners["two-candidates"].address, "two-candidates")
    response = await client.setup()
    assert response.status == FAILURE
    assert response.error.code == ErrorCode.SETUP_MANY_CANDIDATES
    assert "main.First" in response.error.message and "main.Second" in response.error.message
    await client.close()


async def test_setup_with_unknown_base_class_is_a_clear_error(layout, fresh_runner):
    runner = fresh_runner("counter")
    client = RawCoordinator(layout, runner.address, "counter")
    response = await client.setup("sr_testgame.base.NoSuchBase")
    assert response.status == FAILURE
    assert response.error.code == ErrorCode.SETUP_BASE_CLASS
    # A failed setup leaves the model usable once set up correctly.
    assert (await client.setup()).status == OK
    assert (await client.call("echo", 5)).status == OK
    await client.close()


async def test_call_before_setup_is_refused(layout, fresh_runner):
    runner = fresh_runner("counter")
    client = RawCoordinator(layout, runner.address, "counter")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.call("echo", 1)
    # Before Setup no method is declared, so nothing is callable.
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await client.close()


async def test_setup_reports_class_and_declared_methods_and_is_idempotent(layout, runners):
    client = RawCoordinator(layout, runners["counter"].address, "counter")
    first = await client.setup()
    again = await client.setup()
    assert first.status == again.status == OK
    assert first.class_name == "Counter"
    assert list(first.methods) == ["count", "echo", "fail", "hang"]
    await client.close()


async def test_async_model_methods_work(layout, runners):
    client = RawCoordinator(layout, runners["async-model"].address, "async-model")
    assert (await client.setup()).status == OK
    response = await client.call("echo", [1, "two", None, True])
    assert response.status == OK
    assert codec.from_variant(response.output) == {"echoed": [1, "two", None, True]}
    await client.close()


async def test_model_exception_is_a_failure_without_traceback(layout, runners):
    client = RawCoordinator(layout, runners["counter"].address, "counter")
    await client.setup()
    response = await client.call("fail", "boom")
    assert response.status == FAILURE
    assert response.error.code == ErrorCode.MODEL_RAISED
    assert response.error.message == "RuntimeError: boom"
    await client.close()


async def _watch_health(channel, service: str, seen: list[int]) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    async for update in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
        seen.append(update.status)


async def test_hanging_model_is_cancelled_restarted_and_serves_again(layout, fresh_runner):
    runner = fresh_runner("counter")
    client = RawCoordinator(layout, runner.address, "counter")
    assert (await client.setup()).status == OK
    assert (await client.call("echo", 1)).status == OK
    assert await client.count() == 1

    seen: list[int] = []
    watcher = asyncio.create_task(_watch_health(client.channel, "counter", seen))
    while not seen:
        await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.call("hang", 3600, timeout=1.0)
    assert response.status == TIMEOUT
    assert response.error.code == ErrorCode.MODEL_TIMEOUT
    assert loop.time() - started < 1.0  # the runner answers before the caller's deadline

    # The next call is served by a fresh worker (the counter restarted from 0, setup replayed).
    response = await client.call("echo", 2, timeout=30)
    assert response.status == OK
    assert await client.count() == 1
    while seen[-1] != SERVING:
        await asyncio.sleep(0.01)
    watcher.cancel()
    # Health went NOT_SERVING while the worker was replaced, then SERVING again.
    assert seen[0] == SERVING and NOT_SERVING in seen and seen[-1] == SERVING
    await client.close()


async def test_client_cancelling_a_call_kills_the_running_model(layout, fresh_runner):
    runner = fresh_runner("counter")
    client = RawCoordinator(layout, runner.address, "counter")
    await client.setup()
    body = client.call_body("hang", 3600)
    # No deadline: only the client going away can end this call.
    hanging = asyncio.create_task(
        client.raw(CALL_RPC, body, ((TOKEN_KEY, client.token(body, method="hang")),), timeout=None)
    )
    await asyncio.sleep(0.5)
    hanging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hanging
    response = await client.call("echo", 3, timeout=30)
    assert response.status == OK
    assert await client.count() == 1  # a new worker: the hanging one was killed
    await client.close()


async def test_worker_crash_is_reported_and_the_model_restarts(layout, fresh_runner, tmp_path):
    submission = write_submission(
        tmp_path,
        "crasher",
        {"echo": "def echo(self, value):\n        if value == 'die':\n            os._exit(3)\n        return value"},
        imports="import os",
    )
    runner = fresh_runner("counter", submission)
    client = RawCoordinator(layout, runner.address, "counter")
    await client.setup()
    response = await client.call("echo", "die")
    assert response.status == FAILURE
    assert response.error.code == ErrorCode.WORKER_CRASHED
    assert "exit code 3" in response.error.message
    response = await client.call("echo", "alive", timeout=30)
    assert response.status == OK and codec.from_variant(response.output) == "alive"
    await client.close()


async def test_model_output_that_cannot_be_encoded_is_a_failure(layout, fresh_runner, tmp_path):
    submission = write_submission(
        tmp_path,
        "garbage",
        {"echo": "def echo(self, value):\n        return object()", "count": "def count(self):\n        return {1, 2}"},
    )
    runner = fresh_runner("counter", submission)
    client = RawCoordinator(layout, runner.address, "counter")
    await client.setup()
    for method in ("echo", "count"):
        response = await client.call(method, 1) if method == "echo" else await client.call(method)
        assert response.status == FAILURE
        assert response.error.code == ErrorCode.MODEL_OUTPUT_INVALID
    await client.close()


def test_worker_environment_holds_no_secret(layout, fresh_runner, tmp_path, monkeypatch):
    """The worker gets a fixed, clean environment: nothing of the runner's leaks in."""
    monkeypatch.setenv("SUPER_SECRET_TOKEN", "do-not-leak")
    probe = (
        "def echo(self, value):\n"
        "        fds = {}\n"
        "        for fd in os.listdir('/proc/self/fd'):\n"
        "            try:\n"
        "                fds[fd] = os.readlink(f'/proc/self/fd/{fd}')\n"
        "            except FileNotFoundError:\n"
        "                pass  # the listing's own descriptor, closed by now\n"
        "        return {'env': dict(os.environ), 'fds': fds}"
    )
    submission = write_submission(tmp_path, "env", {"echo": probe}, imports="import os")
    runner = fresh_runner("counter", submission)

    async def probe():
        client = RawCoordinator(layout, runner.address, "counter")
        await client.setup()
        response = await client.call("echo", 0)
        await client.close()
        return codec.from_variant(response.output)

    seen = asyncio.run(probe())
    assert "SUPER_SECRET_TOKEN" not in seen["env"]
    assert set(seen["env"]) <= {
        "PATH", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "LC_CTYPE",
    }
    # stdin (/dev/null), stdout and stderr (the log pipe) and the two private protocol
    # pipes: nothing inherited from the runner.
    fds = seen["fds"]
    assert fds["0"] == "/dev/null"
    assert fds["1"] == fds["2"] and fds["2"].startswith("pipe:")
    others = {fd: target for fd, target in fds.items() if fd not in ("0", "1", "2")}
    assert len(others) == 2 and all(target.startswith("pipe:") for target in others.values()), fds
    assert str(MODELS) not in str(seen["env"])
