"""One model of a model node stopped or redeployed on its own; the node's other models untouched.

Real runner processes with their sandboxed workers, real TLS, the real orchestrator and
client. The orchestrator packs two models into one runner and drives it through the
runner's control pipe (`runner/control.py`); the tests watch deployments, the worker
processes (in /proc) and the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secure_runner import pki
from secure_runner.client.results import CallStatus
from secure_runner.errors import ErrorCode
from secure_runner.orchestrator.service import ModelBoard
from secure_runner.v1 import orchestrator_pb2, runner_pb2

from conftest import (
    CRUNCH, MODELS, RawCoordinator, RunnerProcess, assert_refused, by_id, connected, eventually, fresh_pki, json_args,
    orchestrating, write_submission,
)

COUNTER = MODELS / "submissions" / "counter"
RUNNING = orchestrator_pb2.MODEL_STATE_RUNNING
STARTING = orchestrator_pb2.MODEL_STATE_STARTING
STOPPED = orchestrator_pb2.MODEL_STATE_STOPPED
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Both on node-0, reached over one channel. LEAVER sorts first: the node's FanOut is sent on
# behalf of LEAVER too, and forgetting it must not cancel the fan-out in flight for KEEPER.
KEEPER, LEAVER = "beta", "alpha"
NODE = "node-0"


def worker_pids(runner_pid: int) -> dict[str, int]:
    """Model id -> pid of the runner's worker for it, read from /proc (its cgroup is `<model>.<serial>`)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cgroup = next(line for line in (entry / "cgroup").read_text().splitlines() if "secure-runner" in line)
        except (OSError, ValueError, IndexError, StopIteration):
            continue  # not a process, or gone meanwhile
        if ppid == runner_pid and b"secure_runner.runner.worker" in argv:
            found[cgroup.rpartition("/")[2].rpartition(".")[0]] = int(entry.name)
    return found


@contextlib.asynccontextmanager
async def packed_node(tmp_path: Path, **client_settings):
    """An orchestrator running KEEPER and LEAVER in one runner (each from its own folder), and a client."""
    layout = fresh_pki(tmp_path, KEEPER, LEAVER)
    models = {m: shutil.copytree(COUNTER, tmp_path / "code" / m) for m in (KEEPER, LEAVER)}
    async with orchestrating(layout, tmp_path, models, models_per_node=2) as orchestrator:
        assert {orchestrator.board.get(m).node_id for m in models} == {NODE}
        async with connected(layout, orchestrator.port, **client_settings) as client:
            assert await client.ready(10)
            yield layout, orchestrator, client


def deployment(orchestrator, model_id: str) -> tuple[int, str]:
    """The model's (state, deployment id) on the orchestrator's board."""
    info = orchestrator.board.get(model_id)
    return info.state, info.deployment_id


async def test_stopping_one_model_leaves_the_others_of_its_node_untouched(tmp_path):
    async with packed_node(tmp_path) as (layout, orchestrator, client):
        runner = orchestrator.runner_process(KEEPER)
        workers = worker_pids(runner.pid)
        assert set(workers) == {KEEPER, LEAVER}
        keeper = deployment(orchestrator, KEEPER)

        keeper_results, stopped = [], asyncio.Event()

        async def keep_calling() -> None:  # every model, back to back, before, during and after the stop
            while not stopped.is_set():
                keeper_results.append(by_id(await client.call("echo", json_args(1)))[KEEPER])

        calling = asyncio.create_task(keep_calling())
        await eventually(lambda: len(keeper_results) >= 3, what="calls before the stop")
        assert await orchestrator.stop_model(LEAVER, orchestrator.board.get(LEAVER).deployment_id)
        assert not Path(f"/proc/{workers[LEAVER]}").exists()  # killed and reaped before the runner confirmed
        await eventually(lambda: LEAVER not in client.states, what="the client applying the stop")
        after = len(keeper_results)
        await eventually(lambda: len(keeper_results) >= after + 3, what="calls after the stop")
        stopped.set()
        await calling
        assert {(r.status, r.deployment_id) for r in keeper_results} == {(CallStatus.SUCCESS, keeper[1])}

        results = by_id(await client.call("echo", json_args(2), models=[KEEPER, LEAVER]))
        assert (results[KEEPER].status, results[KEEPER].deployment_id) == (CallStatus.SUCCESS, keeper[1])
        assert (results[LEAVER].status, results[LEAVER].reason) == (CallStatus.FAILURE, ErrorCode.MODEL_UNAVAILABLE)
        assert deployment(orchestrator, KEEPER) == keeper and deployment(orchestrator, LEAVER)[0] == STOPPED
        assert orchestrator.runner_process(KEEPER) is runner and runner.returncode is None
        assert worker_pids(runner.pid) == {KEEPER: workers[KEEPER]}

        # The runner itself refuses calls for the stopped model, and its health says so.
        raw = RawCoordinator(layout, orchestrator.board.get(KEEPER).address, LEAVER, server_model_id=NODE)
        try:
            await assert_refused(raw.call("echo", 3), grpc.StatusCode.NOT_FOUND, ErrorCode.MODEL_UNKNOWN)
            health = health_pb2_grpc.HealthStub(raw.channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=LEAVER), timeout=5)
            assert reply.status == NOT_SERVING
        finally:
            await raw.close()


async def test_a_failure_report_stops_only_that_model_and_a_later_node_restart_leaves_it_out(tmp_path):
    async with packed_node(tmp_path, max_consecutive_failures=2) as (_layout, orchestrator, client):
        runner = orchestrator.runner_process(KEEPER)
        workers = worker_pids(runner.pid)
        keeper = deployment(orchestrator, KEEPER)
        for _ in range(2):  # the model's own faults, up to the limit: the client reports it
            (result,) = (await client.call("fail", json_args("boom"), models=[LEAVER])).values()
            assert result.reason == ErrorCode.MODEL_RAISED
        await eventually(lambda: client.pending_reports == [], what="the failure report")
        assert deployment(orchestrator, LEAVER)[0] == STOPPED
        await eventually(lambda: LEAVER not in worker_pids(runner.pid), what="the stopped model's worker to go")
        assert worker_pids(runner.pid) == {KEEPER: workers[KEEPER]} and runner.returncode is None
        assert deployment(orchestrator, KEEPER) == keeper
        results = by_id(await client.call("echo", json_args(1), models=[KEEPER, LEAVER]))
        assert (results[KEEPER].status, results[KEEPER].deployment_id) == (CallStatus.SUCCESS, keeper[1])
        assert results[LEAVER].message == "disconnected after 2 consecutive failures"

        # The runner dies: the node comes back as a new deployment of the model still deployed only.
        runner.kill()
        await eventually(lambda: deployment(orchestrator, KEEPER)[0] == RUNNING
                         and deployment(orchestrator, KEEPER)[1] != keeper[1], timeout=30, what="the node's recovery")
        restarted = orchestrator.runner_process(KEEPER)
        argv = Path(f"/proc/{restarted.pid}/cmdline").read_bytes().split(b"\0")
        assert [a for a in argv if a.startswith((f"{KEEPER}=".encode(), f"{LEAVER}=".encode()))] == [
            f"{KEEPER}={tmp_path / 'code' / KEEPER}".encode()
        ]
        assert deployment(orchestrator, LEAVER)[0] == STOPPED
        assert set(worker_pids(restarted.pid)) == {KEEPER}


async def _states_of(board: ModelBoard, model_id: str, seen: list[tuple[int, str]]) -> None:
    """Append each (state, deployment id) of `model_id` the board shows, until cancelled."""
    revision = -1
    while True:
        snapshot = await board.wait_after(revision, 60)
        revision = snapshot.revision
        info = next(m for m in snapshot.models if m.model_id == model_id)
        if not seen or seen[-1] != (info.state, info.deployment_id):
            seen.append((info.state, info.deployment_id))


async def test_redeploying_one_model_gives_only_it_a_new_deployment_and_a_fresh_worker(tmp_path):
    async with packed_node(tmp_path) as (_layout, orchestrator, client):
        runner = orchestrator.runner_process(KEEPER)
        workers = worker_pids(runner.pid)
        keeper, leaver = deployment(orchestrator, KEEPER), deployment(orchestrator, LEAVER)
        assert {m: r.status for m, r in by_id(await client.call("echo", json_args(1))).items()} == {
            KEEPER: CallStatus.SUCCESS, LEAVER: CallStatus.SUCCESS,
        }
        seen: list[tuple[int, str]] = []
        watching = asyncio.create_task(_states_of(orchestrator.board, LEAVER, seen))
        await eventually(lambda: seen == [leaver], what="the watcher")
        assert await orchestrator.redeploy(LEAVER)
        new = deployment(orchestrator, LEAVER)
        await eventually(lambda: seen[-1] == new, what="the watcher")
        watching.cancel()
        assert seen == [leaver, (STARTING, new[1]), new] and new[0] == RUNNING and new[1] != leaver[1]

        await eventually(lambda: any(m.deployment_id == new[1] for m in client.models), what="the new deployment")
        assert await client.ready(10)
        results = by_id(await client.call("count"))
        assert (results[LEAVER].output, results[LEAVER].deployment_id) == (0, new[1])  # a fresh instance
        assert (results[KEEPER].output, results[KEEPER].deployment_id) == (1, keeper[1])  # the same instance
        assert deployment(orchestrator, KEEPER) == keeper
        now = worker_pids(runner.pid)
        assert now[KEEPER] == workers[KEEPER] and now[LEAVER] != workers[LEAVER]
        assert orchestrator.runner_process(KEEPER) is runner and runner.returncode is None


async def test_malformed_control_lines_are_refused_and_the_runner_serves_on(layout, tmp_path):
    private = pki.PkiLayout(shutil.copytree(layout.root, tmp_path / "pki"))
    pki.issue_runner_certificate(private, NODE)
    runner = RunnerProcess(
        private, "counter", None, "--model", f"async-model={MODELS / 'submissions' / 'async-model'}",
        "--node-id", NODE, control=True,
    )
    try:
        refused = {
            b"": ErrorCode.MALFORMED_REQUEST,
            b"HELLO counter": ErrorCode.MALFORMED_REQUEST,
            b"stop counter": ErrorCode.MALFORMED_REQUEST,
            b"STOP": ErrorCode.INVALID_VALUE,
            b"STOP Counter": ErrorCode.INVALID_VALUE,
            b"STOP counter now": ErrorCode.INVALID_VALUE,
            b"STOP \xffcounter": ErrorCode.INVALID_VALUE,
            b"STOP ghost": ErrorCode.MODEL_UNKNOWN,
            b"REDEPLOY " + b"a" * 200: ErrorCode.MALFORMED_REQUEST,
            b"x" * 10_000 + b"STOP counter": ErrorCode.MALFORMED_REQUEST,  # dropped whole, tail included
        }
        assert {line: runner.command(line) for line in refused} == {
            line: f"ERROR {code}" for line, code in refused.items()
        }
        coordinators = {m: RawCoordinator(private, runner.address, m, server_model_id=NODE) for m in ("counter", "async-model")}
        for coordinator in coordinators.values():
            assert (await coordinator.setup()).status == runner_pb2.CALL_STATUS_SUCCESS
        assert await coordinators["counter"].count() == 0

        audited = len(runner.audit_entries())
        assert runner.command(b"STOP counter") == "OK STOP counter"
        denials = [e for e in runner.audit_entries()[:audited] if e["what"].get("rpc") == "control"]
        # Identical refusals in a row are one audit line with a count (transport/audit_log.py).
        assert [(e["decision"], e["code"]) for e in denials] == [("deny", str(c)) for c in dict.fromkeys(refused.values())]
        assert all(set(e["what"]) == {"rpc"} for e in denials)  # the refused line itself is never logged
        last = runner.audit_entries()[-1]
        assert (last["decision"], last["who"], last["what"]) == (
            "allow", "orchestrator (control socket)", {"rpc": "control", "command": "STOP", "model": "counter"}
        )
        await assert_refused(coordinators["counter"].call("count"), grpc.StatusCode.NOT_FOUND, ErrorCode.MODEL_UNKNOWN)
        assert (await coordinators["async-model"].call("echo", 1)).status == runner_pb2.CALL_STATUS_SUCCESS

        assert runner.command(b"STATUS counter") == f"ERROR {ErrorCode.MODEL_UNKNOWN}"  # the node is NODE
        answer = runner.command(f"STATUS {NODE}".encode()).split(" ", 4)
        assert answer[:4] == ["OK", "STATUS", NODE, "test-deployment"]
        assert set(json.loads(answer[4])) == {"async-model"}
        calls = json.loads(answer[4])["async-model"]["calls"]  # the runner's own counters (Setup is no call)
        assert (calls["calls"], calls["failures"], calls["last_status"], calls["last_failure_code"]) == (1, 0, "SUCCESS", "")
        assert calls["last_latency_us"] > 0 and calls["last_call_ms"] > 0

        runner.close_control()  # the orchestrator going away ends nothing: the runner serves on
        await asyncio.sleep(0.2)
        assert runner.proc.poll() is None
        assert (await coordinators["async-model"].call("echo", 2)).status == runner_pb2.CALL_STATUS_SUCCESS
        for coordinator in coordinators.values():
            await coordinator.close()
    finally:
        runner.stop()


async def test_a_model_stopped_mid_call_gets_no_new_worker_even_if_that_call_crashes_it(tmp_path):
    layout = fresh_pki(tmp_path, "crasher", "steady")
    pki.issue_runner_certificate(layout, NODE)
    crasher = write_submission(
        tmp_path, "crasher", {"echo": "def echo(self, value):\n        time.sleep(value)\n        os._exit(3)"},
        imports="import os\nimport time",
    )
    runner = RunnerProcess(layout, "crasher", crasher, "--model", f"steady={COUNTER}", "--node-id", NODE, control=True)
    coordinator = RawCoordinator(layout, runner.address, "crasher", server_model_id=NODE)
    try:
        assert (await coordinator.setup()).status == runner_pb2.CALL_STATUS_SUCCESS
        call = asyncio.create_task(coordinator.call("echo", 0.5))
        await asyncio.sleep(0.2)  # the call is in the model
        assert runner.command(b"STOP crasher") == "OK STOP crasher"  # once the call ended
        assert (await call).error.code == ErrorCode.WORKER_CRASHED
        await asyncio.sleep(1.0)  # a restart scheduled by the crash (no backoff for a first one) would be up
        assert set(worker_pids(runner.proc.pid)) == {"steady"}
    finally:
        await coordinator.close()
        runner.stop()


async def test_only_the_orchestrators_user_reaches_the_control_socket(layout, tmp_path):
    """Boundary 5: the socket's directory is private, and the runner refuses to start with any other."""
    private = pki.PkiLayout(shutil.copytree(layout.root, tmp_path / "pki"))
    runner = RunnerProcess(private, "counter", None, control=True)
    try:
        assert oct(runner.control_socket.parent.stat().st_mode & 0o777) == "0o700"
        probe = (  # another user on the host (a worker runs as one) tries to connect
            "import os, socket\nos.setgid(65534); os.setuid(65534)\n"
            f"try:\n    socket.socket(socket.AF_UNIX).connect({str(runner.control_socket)!r})\n"
            "except PermissionError:\n    print('refused')\nelse:\n    print('connected')\n"
        )
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
        assert done.stdout.strip() == "refused", done
        assert runner.command(b"STOP counter") == "OK STOP counter"  # its own user still can
    finally:
        runner.stop()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    pki.issue_runner_certificate(private, "counter")
    refused = subprocess.run(
        [sys.executable, "-m", "secure_runner.cli", "runner", "--crunch", CRUNCH, "--model", f"counter={COUNTER}",
         "--pki", str(private.root), "--audit-log", str(tmp_path / "a.jsonl"), "--control-socket", str(shared / "c.sock")],
        capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode == 2 and f"must be a directory of uid {os.geteuid()}, mode 0700" in refused.stderr
    assert not (shared / "c.sock").exists()
