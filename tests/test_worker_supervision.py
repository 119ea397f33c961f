"""Setup, deadlines and restarts of real worker subprocesses behind a real runner."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secure_runner import codec
from secure_runner.errors import ErrorCode
from secure_runner.runner import ipc
from secure_runner.runner.supervisor import MAX_CALL_ANSWER_BYTES, CpuAccount, CpuSample
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import runner_pb2, worker_pb2

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
    # stdin (/dev/null), stdout and stderr (the log pipe), the two private protocol pipes
    # and its own payload socket (runner/shared_payload.py): nothing else from the runner.
    fds = seen["fds"]
    assert fds["0"] == "/dev/null"
    assert fds["1"] == fds["2"] and fds["2"].startswith("pipe:")
    others = {fd: target for fd, target in fds.items() if fd not in ("0", "1", "2")}
    assert sorted(target.partition(":")[0] for target in others.values()) == ["pipe", "pipe", "socket"], fds
    assert str(MODELS) not in str(seen["env"])


async def test_forged_protocol_frames_from_model_code_are_refused(layout, fresh_runner, tmp_path):
    """Model code that finds the protocol pipe and writes to it is caught, never believed."""
    finder = (
        "import fcntl, os\n\n\ndef protocol_out(fd):\n    try:\n"
        "        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY\n"
        "    except OSError:\n        return False\n"
    )
    forge = "def echo(self, value):\n        [os.write(fd, bytes.fromhex(value)) for fd in range(3, 64) if protocol_out(fd)]"
    submission = write_submission(tmp_path, "forger", {"echo": forge}, imports=finder)
    runner = fresh_runner("counter", submission)
    client = RawCoordinator(layout, runner.address, "counter")
    assert (await client.setup()).status == OK
    setup_answer = worker_pb2.WorkerResponse(setup=runner_pb2.SetupResponse(status=OK))
    forgeries = {  # refused at the header, before the runner reads any of the answer
        "over the answer cap": (ipc.HEADER.pack(MAX_CALL_ANSWER_BYTES + 1).hex(), ErrorCode.MODEL_OUTPUT_TOO_LARGE),
        "wrong kind": (ipc.encode_frame(setup_answer.SerializeToString()).hex(), ErrorCode.WORKER_PROTOCOL),
    }
    for what, (forgery, code) in forgeries.items():
        response = await client.call("echo", forgery, timeout=30)
        assert (response.status, response.error.code) == (FAILURE, code), what
    await client.close()


# -- the runner's end of the pipes, against a peer driven by hand ---------------------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def run_on_loop(request):
    """Run a scenario on the default event loop and on uvloop (what runners use when installed)."""
    factory = asyncio.new_event_loop
    if request.param == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop

    def run(scenario):
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(scenario())

    return run


class Peer:
    """A stand-in worker: reads the runner's requests and writes whatever a test wants back."""

    def __init__(self) -> None:
        self.requests, requests_in = os.pipe()
        answers_out, self.answers = os.pipe()
        self.channel = ipc.FrameChannel(answers_out, requests_in)
        self._open = {self.requests, requests_in, answers_out, self.answers}

    def hang_up(self, fd: int) -> None:
        os.close(fd)
        self._open.remove(fd)

    def send(self, payload: bytes, timeout: float = 10.0, cap: int = ipc.MAX_FRAME_BYTES) -> asyncio.Future:
        return self.channel.exchange(ipc.encode_frame(payload), cap, timeout)

    def close(self) -> None:
        self.channel.close()
        for fd in self._open:
            os.close(fd)


@contextlib.asynccontextmanager
async def peer():
    made = Peer()
    try:
        yield made
    finally:
        made.close()


def test_channel_round_trips_and_reassembles_an_answer_sent_in_pieces(run_on_loop):
    async def scenario():
        async with peer() as worker:
            for round_no in range(2):
                answer = worker.send(b"ping %d" % round_no)
                assert ipc.read_frame(worker.requests) == b"ping %d" % round_no
                for piece in (b"\x04", b"\x00\x00", b"\x00po", b"ng"):
                    os.write(worker.answers, piece)
                    await asyncio.sleep(0.01)
                assert await answer == b"pong"

    run_on_loop(scenario)


def test_channel_writes_a_request_larger_than_the_pipe_as_it_drains(run_on_loop):
    async def scenario():
        async with peer() as worker:
            big = os.urandom(3 << 20)
            answer = worker.send(big)
            assert await asyncio.to_thread(ipc.read_frame, worker.requests) == big
            ipc.write_frame(worker.answers, b"ok")
            assert await answer == b"ok"

    run_on_loop(scenario)


def test_channel_refuses_an_answer_over_its_cap_and_stays_refused(run_on_loop):
    async def scenario():
        async with peer() as worker:
            answer = worker.send(b"hello?", cap=16)
            os.write(worker.answers, ipc.HEADER.pack(17))  # only the header: refused before any payload
            with pytest.raises(ipc.FrameError, match="over the 16-byte cap"):
                await answer
            with pytest.raises(ipc.FrameError, match="over the 16-byte cap"):
                await worker.send(b"again")

    run_on_loop(scenario)


def test_channel_refuses_bytes_nobody_asked_for(run_on_loop):
    async def scenario():
        async with peer() as unasked, peer() as overlong:
            os.write(unasked.answers, ipc.encode_frame(b"surprise"))
            await asyncio.sleep(0.05)
            with pytest.raises(ipc.FrameError, match="no answer was due"):
                await unasked.send(b"request")
            answer = overlong.send(b"request")
            os.write(overlong.answers, ipc.encode_frame(b"answer") + b"and more")
            with pytest.raises(ipc.FrameError, match="past the end"):
                await answer

    run_on_loop(scenario)


def test_channel_reports_a_closed_pipe_as_such(run_on_loop):
    async def scenario():
        async with peer() as silent, peer() as deaf:
            answer = silent.send(b"request")
            silent.hang_up(silent.answers)
            with pytest.raises(ipc.PipeClosed):
                await answer
            deaf.hang_up(deaf.requests)
            with pytest.raises(ipc.PipeClosed):
                await deaf.send(b"request")

    run_on_loop(scenario)


def test_channel_deadlines_hold_whatever_came_before(run_on_loop):
    async def scenario():
        async with peer() as worker:
            answer = worker.send(b"long deadline", timeout=30)
            ipc.write_frame(worker.answers, b"ok")
            assert await answer == b"ok"
            started = time.monotonic()
            with pytest.raises(TimeoutError):  # an earlier deadline than the last one still counts
                await worker.send(b"short deadline", timeout=0.1)
            assert time.monotonic() - started < 5.0  # not the 30 s of the one before
            with pytest.raises(ipc.FrameError, match="still owes"):  # the late answer would be misread
                await worker.send(b"next")
        async with peer() as worker:
            answer = worker.send(b"short deadline", timeout=0.1)
            ipc.write_frame(worker.answers, b"ok")
            assert await answer == b"ok"
            answer = worker.send(b"longer deadline", timeout=3.0)
            await asyncio.sleep(0.3)  # past the first deadline, within this one
            ipc.write_frame(worker.answers, b"late but in time")
            assert await answer == b"late but in time"
        async with peer() as worker:
            with pytest.raises(TimeoutError):
                await worker.send(b"no time left", timeout=0)
            os.set_blocking(worker.requests, False)
            with pytest.raises(BlockingIOError):  # nothing was sent
                os.read(worker.requests, 1)

    run_on_loop(scenario)


def test_any_call_the_runner_accepts_fits_in_one_worker_frame():
    """A request at gRPC's message cap becomes a worker frame, not a framing error blamed on the model.

    One value at the cap goes to the shared payload; values each just under its threshold stay in the frame.
    """
    from secure_runner.runner.shared_payload import SHARED_THRESHOLD
    from secure_runner.runner.supervisor import WorkerCall
    from secure_runner.transport import tls
    from secure_runner.v1 import values_pb2

    biggest = values_pb2.Argument(position=1, data=values_pb2.Variant(value=b"x" * (tls.MAX_MESSAGE_BYTES - 16)))
    call = WorkerCall.encode("echo", [biggest], [])
    assert call.payload.size == tls.MAX_MESSAGE_BYTES - 16 and len(call.frame) < 100
    call.close()
    value = values_pb2.Variant(value=b"x" * (SHARED_THRESHOLD - 16))
    count = tls.MAX_MESSAGE_BYTES // (SHARED_THRESHOLD + 16)
    call = WorkerCall.encode("echo", [values_pb2.Argument(position=i, data=value) for i in range(1, count + 1)], [])
    assert call.payload is None and len(call.frame) > tls.MAX_MESSAGE_BYTES - 2 * SHARED_THRESHOLD  # it still fits


def test_a_wait_still_pending_at_the_deadline_counts_as_starvation():
    """The kernel counts a wait only when the task next runs: a worker still waiting must not look idle."""
    start = CpuSample(at=0, main_waited=0, process_ran=0)
    counted_only = CpuSample(at=1_000_000_000, main_waited=200_000_000, process_ran=5_000_000)
    assert not counted_only.starved_since(start)  # a fifth of the window counted: judged slow, the model's
    still_waiting = CpuSample(at=1_000_000_000, main_waited=200_000_000, process_ran=5_000_000,
                              pending_wait=700_000_000)
    assert still_waiting.starved_since(start)
    ran_itself = CpuSample(at=1_000_000_000, main_waited=0, process_ran=900_000_000, pending_wait=700_000_000)
    assert not ran_itself.starved_since(start)  # a model that used its CPU is never starved


def test_a_sleeping_process_has_no_pending_wait():
    """A process asleep (state S) is not waiting for a CPU, whatever its scheduler clock says."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        account = CpuAccount(sleeper.pid)
        sample = account.sample()
        assert sample is not None and sample.pending_wait == 0  # state S: not waiting for a CPU
        assert sample.process_ran >= 0 and sample.main_waited >= 0
        account.close()
    finally:
        sleeper.kill()
        sleeper.wait()
