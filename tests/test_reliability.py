"""Reliability of the client and the orchestrator (issue 5), against real processes.

Each test starts real runners (and their sandboxed workers), a real orchestrator and
the real client, then breaks something for real: a frozen runner (SIGSTOP), a killed
orchestrator, a crashing worker, a runner that cannot start. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secure_runner import pki
from secure_runner.client.remote_model import ModelState
from secure_runner.client.results import CallStatus, Fault
from secure_runner.errors import ErrorCode, RequestError
from secure_runner.orchestrator.credentials import sign_delegation
from secure_runner.orchestrator.service import ModelBoard, OrchestratorServer
from secure_runner.v1 import orchestrator_pb2
from secure_runner.v1.values_pb2 import Argument, KwArgument, Variant, VariantType

from conftest import (
    CRUNCH, MODELS, TESTS, by_id, connected, eventually, fresh_pki, json_args, make_client, orchestrating,
    write_submission,
)

COUNTER = MODELS / "submissions" / "counter"
RUNNING = orchestrator_pb2.MODEL_STATE_RUNNING
STOPPED = orchestrator_pb2.MODEL_STATE_STOPPED
RECOVERING = orchestrator_pb2.MODEL_STATE_RECOVERING
STARTING = orchestrator_pb2.MODEL_STATE_STARTING


async def one(client, method: str, arguments=None, model_id: str = "counter"):
    (result,) = (await client.call(method, arguments, models=[model_id])).values()
    return result


# -- coordinator mistakes -------------------------------------------------------------------


async def test_unknown_method_and_unencodable_arguments_raise_and_blame_no_model(tmp_path):
    layout = fresh_pki(tmp_path, "counter")
    async with orchestrating(layout, tmp_path, {"counter": COUNTER}) as orchestrator:
        async with connected(layout, orchestrator.port, max_consecutive_failures=1, max_consecutive_timeouts=1) as client:
            audit = orchestrator.settings.audit_folder / "runner-counter.jsonl"
            sent_before = audit.read_text()
            json_variant = Variant(type=VariantType.JSON, value=b'{"not": json')
            mistakes = [
                ("secret_method", json_args(1), None, ErrorCode.METHOD_NOT_ALLOWED),
                ("__init__", None, None, ErrorCode.METHOD_NOT_ALLOWED),
                ("", None, None, ErrorCode.METHOD_NOT_ALLOWED),
                ("echo", [Argument(position=1, data=json_variant)], None, ErrorCode.INVALID_VALUE),
                ("echo", json_args(1, 2)[1:], None, ErrorCode.INVALID_ARGUMENTS),  # position 2 without 1
                ("echo", [1, 2], None, ErrorCode.INVALID_ARGUMENTS),  # not Argument messages
                ("echo", None, [KwArgument(keyword="_x", data=json_args(1)[0].data)], ErrorCode.INVALID_ARGUMENTS),
                ("echo", lambda model: 1 / 0, None, ErrorCode.INVALID_ARGUMENTS),  # per-model callable fails
                ("echo", lambda model: [object()], None, ErrorCode.INVALID_ARGUMENTS),
            ]
            for method, arguments, kwargs, code in mistakes:
                for _ in range(3):  # more than either limit
                    with pytest.raises(RequestError) as err:
                        await client.call(method, arguments, kwargs)
                    assert err.value.code == code, (method, err.value)
            assert audit.read_text() == sent_before  # not one request reached the runner
            assert client.states == {"counter": ModelState.READY}
            assert (await one(client, "count")).output == 0  # the model saw none of it
            assert orchestrator.board.get("counter").state == RUNNING


# -- init, background connection, cooling down -----------------------------------------------


async def test_init_with_half_the_models_unreachable_returns_within_its_budget(tmp_path):
    model_ids = ("up-one", "up-two", "frozen-one", "frozen-two")
    layout = fresh_pki(tmp_path, *model_ids)
    async with orchestrating(layout, tmp_path, dict.fromkeys(model_ids, COUNTER), models_per_node=1) as orchestrator:
        frozen = [orchestrator.runner_process(m).pid for m in ("frozen-one", "frozen-two")]
        for pid in frozen:  # they accept TCP connections but never answer the TLS handshake
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            async with connected(layout, orchestrator.port, connect_timeout=2.0) as client:
                assert time.monotonic() - started < 2.0 + 0.5
                states = client.states
                assert states["up-one"] is states["up-two"] is ModelState.READY
                assert states["frozen-one"] is not ModelState.READY and states["frozen-two"] is not ModelState.READY

                started = time.monotonic()
                results = by_id(await client.call("echo", json_args("tick")))
                assert time.monotonic() - started < 0.5  # nothing waits on the frozen ones
                assert set(results) == set(model_ids)
                for model_id in ("up-one", "up-two"):
                    assert results[model_id].status is CallStatus.SUCCESS and results[model_id].output == "tick"
                for model_id in ("frozen-one", "frozen-two"):
                    result = results[model_id]
                    assert (result.status, result.reason, result.latency_us) == (CallStatus.FAILURE, ErrorCode.UNREACHABLE, 0)
                    assert result.fault is Fault.INFRASTRUCTURE

                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
                assert await client.ready(20)  # they join in the background
                results = by_id(await client.call("echo", json_args("tock")))
                assert {m: r.status for m, r in results.items()} == dict.fromkeys(model_ids, CallStatus.SUCCESS)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)


async def test_init_raises_when_the_orchestrator_cannot_be_reached_in_time(layout):
    client = make_client(layout, 9, connect_timeout=1.0)  # nothing listens on port 9
    started = time.monotonic()
    with pytest.raises(RequestError) as err:
        await client.init()
    assert err.value.code == ErrorCode.UNREACHABLE
    assert time.monotonic() - started < 1.5
    await client.close()


async def test_a_model_cooling_down_is_skipped_and_only_real_faults_count(tmp_path):
    crasher = write_submission(
        tmp_path, "crasher",
        {"echo": "def echo(self, value):\n        if value == 'crash':\n            os._exit(3)\n        return value"},
        imports="import os",
    )
    layout = fresh_pki(tmp_path, "counter")
    async with orchestrating(layout, tmp_path, {"counter": crasher}) as orchestrator:
        async with connected(layout, orchestrator.port, max_consecutive_failures=2) as client:
            crash = await one(client, "echo", json_args("crash"))
            assert (crash.status, crash.reason, crash.fault) == (CallStatus.FAILURE, ErrorCode.WORKER_CRASHED, Fault.MODEL)
            assert client.states["counter"] is ModelState.COOLING_DOWN
            for _ in range(5):  # its worker is being replaced: skipped at once, never counted
                skipped = await one(client, "echo", json_args("hello"))
                assert (skipped.status, skipped.reason, skipped.latency_us) == (CallStatus.FAILURE, ErrorCode.COOLING_DOWN, 0)
                assert skipped.fault is Fault.INFRASTRUCTURE
            assert await client.ready(10)
            assert (await one(client, "echo", json_args("hello"))).output == "hello"  # resets the count
            for crashes in (1, 2):
                assert await client.ready(10)
                assert (await one(client, "echo", json_args("crash"))).reason == ErrorCode.WORKER_CRASHED
                assert ("counter" in client.states) is (crashes == 1)  # dropped exactly at the limit
            await eventually(lambda: orchestrator.board.get("counter").state == STOPPED, what="the report")
            gone = await one(client, "echo", json_args("hello"))
            assert (gone.reason, gone.message) == (ErrorCode.MODEL_UNAVAILABLE, "disconnected after 2 consecutive failures")


# -- targeting and latency ----------------------------------------------------------------------


async def test_per_model_arguments_and_targeting_by_id(tmp_path):
    model_ids = ("model-a", "model-b", "model-c")
    layout = fresh_pki(tmp_path, *model_ids)
    async with orchestrating(layout, tmp_path, dict.fromkeys(model_ids, COUNTER)) as orchestrator:
        async with connected(layout, orchestrator.port) as client:
            asked = []

            def arguments(model):
                asked.append(model.model_id)
                return json_args(f"{model.model_id} {model.deployment_id}")

            results = by_id(await client.call("echo", arguments))
            assert {m: r.output for m, r in results.items()} == {
                m: f"{m} {orchestrator.board.get(m).deployment_id}" for m in model_ids
            }
            asked.clear()
            results = by_id(await client.call("echo", arguments, models=["model-b", "model-b", "ghost"]))
            assert asked == ["model-b"] and set(results) == {"model-b", "ghost"}
            assert results["ghost"].reason == ErrorCode.MODEL_UNAVAILABLE
            assert results["ghost"].message == "not in the orchestrator's model list"
            asked.clear()
            assert await client.call("echo", arguments, models=[]) == {} and asked == []
            with pytest.raises(RequestError):
                await client.call("echo", arguments, models="model-a")  # one id is not a collection
            kwargs = lambda model: [KwArgument(keyword="seconds", data=json_args(0)[0].data)]  # noqa: E731
            results = by_id(await client.call("hang", None, kwargs, models=["model-c"]))
            assert results["model-c"].status is CallStatus.SUCCESS


async def test_latency_is_the_models_and_the_networks_not_the_coordinators_queueing(tmp_path):
    sleepy = write_submission(
        tmp_path, "sleepy", {"echo": "def echo(self, value):\n        time.sleep(value)\n        return value"},
        imports="import time",
    )
    model_ids = ("fast-one", "fast-two", "fast-three", "sleepy")
    layout = fresh_pki(tmp_path, *model_ids)
    models = {**dict.fromkeys(model_ids[:3], COUNTER), "sleepy": sleepy}
    async with orchestrating(layout, tmp_path, models) as orchestrator:
        async with connected(layout, orchestrator.port) as client:
            await client.call("echo", lambda m: json_args(0))  # warm every channel up

            def slow_coordinator(model):  # 50 ms of the coordinator's own work per model, before any send
                time.sleep(0.05)
                return json_args(0.25 if model.model_id == "sleepy" else 0)

            started = time.monotonic()
            results = by_id(await client.call("echo", slow_coordinator))
            assert time.monotonic() - started >= 4 * 0.05 + 0.25
            for model_id in model_ids[:3]:
                assert results[model_id].status is CallStatus.SUCCESS
                assert 0 < results[model_id].latency_us < 50_000, results[model_id]
                assert 0 < results[model_id].model_latency_us <= results[model_id].latency_us
            assert 250_000 <= results["sleepy"].latency_us < 400_000, results["sleepy"]
            # The runner's figure for the model's own part: the sleep, without the network.
            assert 250_000 <= results["sleepy"].model_latency_us <= results["sleepy"].latency_us


# -- membership: orchestrator restarts, stale events ---------------------------------------------


class StaticOrchestrator:
    """`tests/static_orchestrator.py` as a process: a model list of runners that outlive it."""

    def __init__(self, layout: pki.PkiLayout, folder: Path) -> None:
        self.layout, self.folder, self.port, self.starts = layout, folder, 0, 0
        self.listing = folder / "models.json"
        self.proc: subprocess.Popen | None = None

    def start(self, *runners) -> None:
        self.listing.write_text(json.dumps(
            [{"model_id": r.model_id, "deployment_id": f"{r.model_id}-1", "address": r.address} for r in runners]
        ))
        self.starts += 1
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "static_orchestrator.py"), str(self.layout.root), CRUNCH,
             str(self.listing), str(self.port), str(self.audit_file)],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("READY "), line
        self.port = int(line.split()[1])

    @property
    def audit_file(self) -> Path:
        return self.folder / f"orchestrator-{self.starts}.jsonl"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def test_orchestrator_killed_and_restarted_mid_run(layout, tmp_path, fresh_runner):
    private = pki.PkiLayout(shutil.copytree(layout.root, tmp_path / "pki"))
    counter, other = fresh_runner("counter"), fresh_runner("async-model")
    newcomer = fresh_runner("no-candidate", COUNTER)  # a registered id, hosting a working model
    orchestrator = StaticOrchestrator(private, tmp_path)
    orchestrator.start(counter, other)
    try:
        async with connected(private, orchestrator.port, max_consecutive_failures=2) as client:
            assert {m: r.status for m, r in by_id(await client.call("echo", json_args(0))).items()} == {
                "counter": CallStatus.SUCCESS, "async-model": CallStatus.SUCCESS,
            }
            orchestrator.kill()
            # Calls go on against the models the client knows.
            for n in range(1, 16):
                results = by_id(await client.call("echo", json_args(n)))
                assert results["counter"].output == n and results["async-model"].output == {"echoed": n}
                await asyncio.sleep(0.1)
            # A model disconnected now cannot be reported yet: the report waits, it is not lost.
            for _ in range(2):
                assert (await one(client, "fail", json_args("boom"), "async-model")).reason == ErrorCode.MODEL_RAISED
            assert client.pending_reports == [("async-model", "async-model-1")]
            await asyncio.sleep(1.0)
            assert client.pending_reports == [("async-model", "async-model-1")]

            updates = client.model_list_updates
            orchestrator.start(counter, other, newcomer)  # same port, one more model
            await eventually(lambda: "no-candidate" in client.states, what="the resync")
            assert client.model_list_updates > updates
            assert await client.ready(10)
            results = by_id(await client.call("echo", json_args("again")))
            # The restarted orchestrator still lists the disconnected deployment as running: it stays dropped.
            assert {m: r.status for m, r in results.items()} == {
                "counter": CallStatus.SUCCESS, "no-candidate": CallStatus.SUCCESS,
            }
            await eventually(lambda: client.pending_reports == [], what="the failure report")
            reported = [json.loads(line) for line in orchestrator.audit_file.read_text().splitlines()]
            assert any(e["code"] == "FAILURE_REPORTED" and e["what"]["model"] == "async-model" for e in reported)
    finally:
        orchestrator.kill()


class BoardOrchestrator:
    """An in-process orchestrator whose model list the test writes, for one real counter runner."""

    def __init__(self, layout: pki.PkiLayout, folder: Path, runner) -> None:
        self.layout, self.runner = layout, runner
        self.board = ModelBoard(CRUNCH)
        self.server = OrchestratorServer(self.board, layout, folder / "audit.jsonl", self._refuse_stop)
        self._cert = pki.load_certificate(layout.runner_cert(runner.model_id))

    @staticmethod
    async def _refuse_stop(model_id: str, deployment_id: str) -> bool:
        return False

    def announce(self, deployment_id: str, state=RUNNING) -> orchestrator_pb2.ModelInfo:
        info = orchestrator_pb2.ModelInfo(
            model_id="counter", model_name="Counter", cruncher_id="alice", cruncher_name="Alice",
            deployment_id=deployment_id, address=self.runner.address, state=state,
        )
        info.runner_delegation = sign_delegation(self.layout, CRUNCH, info, self._cert)
        return info

    async def publish(self, client, info: orchestrator_pb2.ModelInfo) -> None:
        """Put one event on the board and wait until the client has applied it."""
        updates = client.model_list_updates
        await self.board.put(info)
        await eventually(lambda: client.model_list_updates > updates, what="the update")


@pytest.fixture
async def board_orchestrator(layout, tmp_path, fresh_runner):
    private = pki.PkiLayout(shutil.copytree(layout.root, tmp_path / "pki"))
    orchestrator = BoardOrchestrator(private, tmp_path, fresh_runner("counter"))
    await orchestrator.board.put(orchestrator.announce("counter-1"))
    orchestrator.port = await orchestrator.server.start()
    yield orchestrator
    await orchestrator.server.stop()


async def test_stale_deployment_events_are_ignored(board_orchestrator):
    orchestrator = board_orchestrator
    async with connected(orchestrator.layout, orchestrator.port) as client:
        async def after(info) -> tuple[str, str, str]:
            """Publish one event; once the client applied it, what a call to counter gives."""
            await orchestrator.publish(client, info)
            await client.ready(10)
            result = await one(client, "echo", json_args(1))
            return result.deployment_id, result.status, result.reason

        announce = orchestrator.announce
        assert await after(announce("counter-2")) == ("counter-2", CallStatus.SUCCESS, "")  # replaced
        assert await after(announce("counter-1")) == ("counter-2", CallStatus.SUCCESS, "")  # stale: ignored
        assert await after(announce("counter-1", STOPPED)) == ("counter-2", CallStatus.SUCCESS, "")  # stale
        recovering, starting = (CallStatus.FAILURE, ErrorCode.MODEL_RECOVERING), (CallStatus.FAILURE, ErrorCode.MODEL_STARTING)
        # The current deployment recovering is not called (down, not gone), and may come back as itself.
        assert await after(announce("counter-2", RECOVERING)) == ("counter-2", *recovering)
        assert await after(announce("counter-2")) == ("counter-2", CallStatus.SUCCESS, "")
        # A new deployment starting ends the old one for good.
        assert await after(announce("counter-3", STARTING)) == ("counter-3", *starting)
        assert await after(announce("counter-2")) == ("counter-3", *starting)  # stale: not reconnected
        assert await after(announce("counter-3")) == ("counter-3", CallStatus.SUCCESS, "")


async def test_a_model_leaving_the_list_mid_call_still_gets_its_one_result(board_orchestrator):
    orchestrator = board_orchestrator
    async with connected(orchestrator.layout, orchestrator.port) as client:
        call = asyncio.create_task(client.call("hang", json_args(30), models=["counter"]))
        await asyncio.sleep(0.3)  # the call is in flight
        await orchestrator.publish(client, orchestrator.announce("counter-1", STOPPED))
        (result,) = (await asyncio.wait_for(call, 5)).values()  # its channel closed under it: still a result
        assert (result.status, result.reason, result.fault) == (CallStatus.FAILURE, ErrorCode.UNREACHABLE, Fault.INFRASTRUCTURE)
        assert result.deployment_id == "counter-1"


# -- the orchestrator keeps its runners up -------------------------------------------------------


async def _states_until(board: ModelBoard, model_id: str, done, timeout: float = 20.0) -> list[tuple[int, str]]:
    """The (state, deployment) of `model_id` in every snapshot until `done(info)`."""
    seen, revision = [], -1
    deadline = time.monotonic() + timeout
    while True:
        snapshot = await board.wait_after(revision, max(deadline - time.monotonic(), 0.01))
        assert snapshot is not None, f"timed out; saw {seen}"
        revision = snapshot.revision
        info = next(m for m in snapshot.models if m.model_id == model_id)
        if not seen or seen[-1] != (info.state, info.deployment_id):
            seen.append((info.state, info.deployment_id))
        if done(info):
            return seen


async def test_orchestrator_restarts_a_crashed_runner_with_backoff_and_a_new_deployment(tmp_path):
    layout = fresh_pki(tmp_path, "steady", "fragile")
    models = {"steady": COUNTER, "fragile": COUNTER}
    async with orchestrating(layout, tmp_path, models, models_per_node=1, restart_backoff_first=0.4) as orchestrator:
        steady = orchestrator.board.get("steady").deployment_id
        deployments = [orchestrator.board.get("fragile").deployment_id]
        for crashes in (1, 2):
            orchestrator.runner_process("fragile").kill()
            killed_at = time.monotonic()
            seen = await _states_until(
                orchestrator.board, "fragile", lambda i: i.state == RUNNING and i.deployment_id not in deployments
            )
            back_after = time.monotonic() - killed_at
            assert seen[-2:] == [(RECOVERING, deployments[-1]), (RUNNING, seen[-1][1])], seen
            deployments.append(seen[-1][1])
            assert back_after >= 0.4 * 2 ** (crashes - 1)  # the backoff doubles
            assert orchestrator.consecutive_failures("fragile") == crashes
        assert len(set(deployments)) == 3
        assert (orchestrator.board.get("steady").state, orchestrator.board.get("steady").deployment_id) == (RUNNING, steady)
        async with connected(layout, orchestrator.port, sync=False) as client:
            results = by_id(await client.call("echo", json_args(1)))
            assert results["fragile"].deployment_id == deployments[-1] and results["fragile"].status is CallStatus.SUCCESS


async def test_orchestrator_survives_a_runner_that_never_becomes_healthy(tmp_path):
    layout = fresh_pki(tmp_path, "steady", "broken")
    models = {"steady": COUNTER, "broken": COUNTER}
    async with orchestrating(
        layout, tmp_path, models, models_per_node=1, restart_backoff_first=0.1, restart_backoff_max=0.4
    ) as orchestrator:
        link = tmp_path / "submissions" / "broken"
        link.unlink()  # from now on its runner fails at start: no submission to run
        orchestrator.runner_process("broken").kill()
        await eventually(lambda: orchestrator.consecutive_failures("broken") >= 4, timeout=30, what="failed restarts")
        assert orchestrator.board.get("broken").state == RECOVERING
        async with connected(layout, orchestrator.port) as client:  # the list is served; the other model too
            results = by_id(await client.call("echo", json_args(1), models=["steady", "broken"]))
            assert results["steady"].status is CallStatus.SUCCESS
            assert results["broken"].reason == ErrorCode.MODEL_RECOVERING
            link.symlink_to(COUNTER)  # fixed: the next restart works, and the client picks it up
            await eventually(lambda: "broken" in client.states, timeout=30, what="the recovered runner")
            assert await client.ready(10)
            results = by_id(await client.call("echo", json_args(2)))
            assert {m: r.status for m, r in results.items()} == {"steady": CallStatus.SUCCESS, "broken": CallStatus.SUCCESS}
        assert orchestrator.board.get("steady").state == RUNNING


def _cmdline(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # gone meanwhile
        return b""


async def test_orchestrator_kills_and_retries_a_runner_that_is_not_ready_in_time(tmp_path):
    layout = fresh_pki(tmp_path, "steady", "sluggish")
    models = {"steady": COUNTER, "sluggish": COUNTER}
    # No runner can start within 10 ms: every start attempt times out and is killed.
    async with orchestrating(
        layout, tmp_path, models, models_per_node=1,
        runner_start_timeout=0.01, restart_backoff_first=0.1, restart_backoff_max=0.2,
    ) as orchestrator:
        await eventually(lambda: orchestrator.consecutive_failures("sluggish") >= 3, what="retries")
        assert orchestrator.board.get("sluggish").state == RECOVERING
        assert not [argv for argv in map(_cmdline, Path("/proc").glob("[0-9]*/cmdline"))  # killed and reaped
                    if b"\0--node-id\0sluggish\0" in argv and str(tmp_path).encode() in argv]
        async with connected(layout, orchestrator.port, connect_timeout=1.0) as client:
            assert client.models == []  # the list is served, with nothing running in it
            orchestrator.settings = dataclasses.replace(orchestrator.settings, runner_start_timeout=30.0)
            await eventually(lambda: set(client.states) == {"steady", "sluggish"}, timeout=30, what="recovery")
            assert await client.ready(10)
            results = by_id(await client.call("echo", json_args(1)))
            assert {m: r.status for m, r in results.items()} == {"steady": CallStatus.SUCCESS, "sluggish": CallStatus.SUCCESS}
