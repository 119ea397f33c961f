"""The operator's commands, end to end: `secure-runner models ...` against a real orchestrator.

A real orchestrator (in-process) runs real runner processes; the CLI runs as its own
process with the test PKI's operator certificate and signing key. Each action must be
done, visible on the model list, and audited with the operator's identity; the same
calls with a coordinator's or a runner's certificate are refused before anything is
done (PEER_UNAUTHENTICATED), and audited too.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys

import grpc
import pytest

from secure_runner.client.results import CallStatus, Fault
from secure_runner.errors import ErrorCode
from secure_runner.operator_cli import OperatorClient, OperatorCredentials
from secure_runner.transport import tls
from secure_runner.transport.status import reason_of
from secure_runner.v1 import orchestrator_pb2

from conftest import CRUNCH, MODELS, by_id, connected, eventually, fresh_pki, json_args, orchestrating, write_submission

RUNNING, STOPPED = orchestrator_pb2.MODEL_STATE_RUNNING, orchestrator_pb2.MODEL_STATE_STOPPED
COUNTER = MODELS / "submissions" / "counter"


async def models_cli(layout, port: int, *args: str, pki=True) -> tuple[int, str, str]:
    """`secure-runner models ...` as a process (the orchestrator shares this event loop: no blocking)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "secure_runner.cli", "models", "--crunch", CRUNCH, "--port", str(port),
        *(["--pki", str(layout.root)] if pki else []), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


def audit_lines(orchestrator) -> list[dict]:
    path = orchestrator.settings.audit_folder / "orchestrator.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
async def three_models(tmp_path):
    """alpha and beta packed on node-0 (alpha writes to stderr when loaded), gamma alone on node-1."""
    layout = fresh_pki(tmp_path, "alpha", "beta", "gamma")
    talker = write_submission(tmp_path, "talker", {}, imports="import sys\nprint('hello from alpha', file=sys.stderr)")
    models = {"alpha": talker, "beta": shutil.copytree(COUNTER, tmp_path / "beta"), "gamma": COUNTER}
    async with orchestrating(layout, tmp_path, models, models_per_node=2) as orchestrator:
        yield layout, orchestrator


async def test_operator_lists_stops_redeploys_and_restarts_models_audited(three_models):
    layout, orchestrator = three_models
    port, board = orchestrator.port, orchestrator.board
    before = {m: board.get(m).deployment_id for m in ("alpha", "beta", "gamma")}

    code, out, err = await models_cli(layout, port, "list")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if not line.startswith(" ")}
    assert set(rows) == {"alpha", "beta", "gamma"}
    for model_id, row in rows.items():
        info = board.get(model_id)
        assert row[1] == "RUNNING" and row[3] == info.node_id and row[4] == info.address and row[5] == before[model_id]
    assert rows["alpha"][3] == rows["beta"][3] == "node-0"

    assert await models_cli(layout, port, "stop", "beta") == (0, "stop beta: done\n", "")
    assert board.get("beta").state == STOPPED and board.get("beta").state_reason == "stopped by an operator"
    assert (board.get("alpha").state, board.get("alpha").deployment_id) == (RUNNING, before["alpha"])  # untouched
    assert (await models_cli(layout, port, "stop", "beta"))[:2] == (1, "stop beta: not done: not running\n")

    assert (await models_cli(layout, port, "redeploy", "alpha"))[:2] == (0, "redeploy alpha: done\n")
    assert board.get("alpha").state == RUNNING and board.get("alpha").deployment_id != before["alpha"]
    assert (await models_cli(layout, port, "redeploy", "beta"))[:2] == (0, "redeploy beta: done\n")  # back from STOPPED
    await eventually(lambda: board.get("beta").state == RUNNING, timeout=30, what="beta back on a new runner")
    assert board.get("beta").deployment_id != before["beta"]

    assert (await models_cli(layout, port, "restart-node", "node-1"))[:2] == (0, "restart-node node-1: done\n")
    await eventually(lambda: board.get("gamma").state == RUNNING and board.get("gamma").deployment_id != before["gamma"],
                     timeout=30, what="gamma restarted")

    async with connected(layout, port) as client:  # its Setup loads alpha, which writes to stderr
        assert await client.ready(10)
    await eventually(lambda: "hello from alpha" in orchestrator.launcher.log_file("node-0").read_text(), what="the log")
    code, out, _ = await models_cli(layout, port, "logs", "alpha", "-n", "5")
    assert code == 0 and "hello from alpha" in out and "beta" not in out

    code, out, _ = await models_cli(layout, port, "list")
    restarts = {line.split()[0]: int(line.split()[6]) for line in out.splitlines()[1:] if not line.startswith(" ")}
    assert restarts["alpha"] >= 1 and restarts["gamma"] == 1

    operator = f"spiffe://{CRUNCH}/operator/"
    done = [(e["what"]["rpc"].rpartition("/")[2], e["what"]["subject"], e["code"]) for e in audit_lines(orchestrator)
            if e["who"].startswith(operator) and "done" in e["what"]]
    assert done == [
        ("ListModels", CRUNCH, "OK"), ("StopModel", "beta", "OK"), ("StopModel", "beta", "NOT_DONE"),
        ("RedeployModel", "alpha", "OK"), ("RedeployModel", "beta", "OK"), ("ListModels", CRUNCH, "OK"),
        ("RestartNode", "node-1", "OK"), ("ModelLogs", "alpha", "OK"), ("ListModels", CRUNCH, "OK"),
    ]


@pytest.mark.parametrize("who", ["coordinator", "runner"])
async def test_operator_calls_with_a_coordinators_or_runners_certificate_are_refused(three_models, who):
    layout, orchestrator = three_models
    cert, key = {
        "coordinator": (layout.coordinator_cert, layout.coordinator_key),
        "runner": (layout.runner_cert("node-0"), layout.runner_key("node-0")),
    }[who]
    credentials = OperatorCredentials(tls.TlsFiles(cert, key, layout.ca_cert), layout.coordinator_identity)
    async with OperatorClient(CRUNCH, "127.0.0.1", orchestrator.port, credentials) as client:
        for action in (client.list(), client.stop("alpha"), client.redeploy("alpha")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await action
            assert (err.value.code(), reason_of(err.value)) == (grpc.StatusCode.UNAUTHENTICATED, ErrorCode.PEER_UNAUTHENTICATED)
    assert orchestrator.board.get("alpha").state == RUNNING
    denied = [e for e in audit_lines(orchestrator) if e["decision"] == "deny"]
    assert denied and denied[0]["code"] == ErrorCode.PEER_UNAUTHENTICATED
    assert denied[0]["what"]["rpc"] == "/secure_runner.v1.Operator/ListModels"
    # The CLI says so too, and fails.
    code, _, err = await models_cli(layout, orchestrator.port, "--cert", str(cert), "--key", str(key),
                                    "--ca", str(layout.ca_cert), "--identity", str(layout.coordinator_identity),
                                    "stop", "alpha", pki=False)
    assert code == 2 and "PEER_UNAUTHENTICATED" in err
    assert orchestrator.board.get("alpha").state == RUNNING



async def test_an_unreadable_submission_fails_alone_and_its_node_mate_serves(tmp_path):
    """One cruncher's broken submission: its reason on the lists, its node-mate RUNNING and answering."""
    layout = fresh_pki(tmp_path, "broken", "healthy")
    broken = shutil.copytree(COUNTER, tmp_path / "broken")
    broken.chmod(0o000)  # the worker (another uid) cannot read it; the runner itself (root) could
    try:
        models = {"broken": broken, "healthy": COUNTER}
        async with orchestrating(layout, tmp_path, models, models_per_node=2) as orchestrator:
            board = orchestrator.board
            assert board.get("healthy").node_id == board.get("broken").node_id == "node-0"
            await eventually(lambda: board.get("broken").state == orchestrator_pb2.MODEL_STATE_RECOVERING,
                             timeout=20, what="the broken model's own failure on the list")
            assert board.get("healthy").state == RUNNING
            reason = board.get("broken").state_reason
            assert reason.split(":")[0] in set(ErrorCode) and board.get("broken").state_since_ms > 0, reason
            async with connected(layout, orchestrator.port) as client:
                assert await client.ready(10)
                results = by_id(await client.call("echo", json_args(1)))
                assert results["healthy"].status is CallStatus.SUCCESS
                assert (results["broken"].reason, results["broken"].fault) == (ErrorCode.MODEL_RECOVERING, Fault.INFRASTRUCTURE)
                assert reason in results["broken"].message
            code, out, _ = await models_cli(layout, orchestrator.port, "list")
            assert code == 0 and f"reason: {reason}"[:60] in out
            assert orchestrator.consecutive_failures("healthy") == 0  # the node was never restarted for it
    finally:
        broken.chmod(0o755)
