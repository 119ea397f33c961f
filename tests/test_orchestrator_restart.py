"""Runners outlive the orchestrator: SIGKILL it mid-fan-out, start it again, and nothing is lost.

The orchestrator runs as a real `secure-runner orchestrator` process (so it can be
SIGKILLed) over real runner processes; a real coordinator calls every model back to
back the whole time. What must hold: no runner restarts (same pids, same deployment
ids), every call to a live runner succeeds while the orchestrator is gone and after it
is back, the model list comes back the same, and a runner that died meanwhile is the
only one restarted. A deliberate stop with --stop-models-on-exit ends every runner.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from secure_runner.client.results import CallStatus, Fault
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.orchestrator.launcher import LauncherError, RunnerSpec
from secure_runner.orchestrator.local import LocalOrchestratorSettings
from secure_runner.orchestrator.processes import ProcessLauncher, process_start_time
from secure_runner.orchestrator.store import StateStore

from conftest import (
    BASE_PATH, CRUNCH, MODELS, by_id, connected, eventually, free_port, fresh_pki, json_args, orchestrating,
)

COUNTER = MODELS / "submissions" / "counter"
MODEL_IDS = ("alpha", "beta", "gamma")  # alpha, beta on node-0; gamma on node-1


class OrchestratorProcess:
    """`secure-runner orchestrator` as a process, on a fixed port so a restarted one is found again."""

    def __init__(self, tmp_path: Path, layout, port: int, *extra: str) -> None:
        self.log = open(tmp_path / "orchestrator.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "secure_runner.cli", "orchestrator", "--crunch", CRUNCH,
             "--submissions", str(tmp_path / "submissions"), "--pki", str(layout.root),
             "--base-path", str(BASE_PATH), "--models-per-node", "2", "--port", str(port), *extra],
            stdout=subprocess.PIPE, stderr=self.log,
        )
        line = self.proc.stdout.readline().decode()
        assert line == f"READY {port}\n", line

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(30) == 0
        self.log.close()


def runner_pids(state: Path) -> dict[str, int]:
    """Node id -> pid of its runner, as the orchestrator's store records it."""
    with sqlite3.connect(state / "orchestrator.sqlite") as db:
        return {node: json.loads(handle)["pid"] for node, handle in db.execute("SELECT node_id, handle FROM nodes")
                if handle}


def listed(client) -> dict[str, str]:
    return {m.model_id: m.deployment_id for m in client.models}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def test_sigkilled_orchestrator_loses_no_call_and_adopts_its_runners(tmp_path):
    layout = fresh_pki(tmp_path, *MODEL_IDS)
    (tmp_path / "submissions").mkdir()
    for model_id in MODEL_IDS:
        (tmp_path / "submissions" / model_id).symlink_to(COUNTER)
    state, port = tmp_path / "state", free_port()
    orchestrator = OrchestratorProcess(tmp_path, layout, port)
    pids = runner_pids(state)
    try:
        assert set(pids) == {"node-0", "node-1"}
        async with connected(layout, port) as client:
            assert await client.ready(10)
            deployments = {m.model_id: m.deployment_id for m in client.models}
            assert set(deployments) == set(MODEL_IDS)
            rounds: list[dict] = []
            calling = True

            async def keep_calling() -> None:
                while calling:
                    rounds.append(by_id(await client.call("echo", json_args(len(rounds)))))
                    await asyncio.sleep(0.01)  # a call that sends nothing does not yield to the loop

            task = asyncio.create_task(keep_calling())
            await eventually(lambda: len(rounds) >= 5, what="calls before the kill")
            orchestrator.kill()  # mid-fan-out
            killed_at = len(rounds)
            await eventually(lambda: len(rounds) >= killed_at + 10, what="calls while the orchestrator is gone")
            updates = client.model_list_updates
            orchestrator = OrchestratorProcess(tmp_path, layout, port)
            await eventually(lambda: client.model_list_updates > updates, timeout=20, what="the model list again")
            back_at = len(rounds)
            await eventually(lambda: len(rounds) >= back_at + 10, what="calls after the restart")
            calling = False
            await task

            # Every round reached every model, and every model answered as the deployment it was.
            assert all({m: (r.status, r.deployment_id) for m, r in results.items()} ==
                       {m: (CallStatus.SUCCESS, d) for m, d in deployments.items()} for results in rounds)
            assert runner_pids(state) == pids and all(alive(pid) for pid in pids.values())  # nothing restarted
            assert {m.model_id: m.deployment_id for m in client.models} == deployments

            # Both down at once: the orchestrator, and gamma's runner while it is gone. On restart
            # only gamma comes back, as a new deployment; alpha and beta are adopted as they were.
            orchestrator.kill()
            os.kill(pids["node-1"], signal.SIGKILL)
            orchestrator = OrchestratorProcess(tmp_path, layout, port, "--stop-models-on-exit")
            await eventually(lambda: set(listed(client)) == set(MODEL_IDS) and listed(client)["gamma"] != deployments["gamma"],
                             timeout=30, what="gamma back as a new deployment")
            assert await client.ready(10)
            results = by_id(await client.call("echo", json_args("after")))
            assert {m: r.status for m, r in results.items()} == dict.fromkeys(MODEL_IDS, CallStatus.SUCCESS)
            assert [results[m].deployment_id for m in ("alpha", "beta")] == [deployments["alpha"], deployments["beta"]]
            assert results["gamma"].deployment_id != deployments["gamma"]
            now = runner_pids(state)
            assert now["node-0"] == pids["node-0"] and now["node-1"] != pids["node-1"]
        log = (tmp_path / "orchestrator.log").read_text()
        assert "adopted model alpha on node node-0" in log and "Unknown child process" not in log
        orchestrator.stop()  # --stop-models-on-exit: a deliberate stop ends the runners
        assert not any(alive(pid) for pid in now.values())
    finally:
        if orchestrator.proc.returncode is None:
            orchestrator.kill()
        for pid in runner_pids(state).values():  # whatever the outcome, no runner is left behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_recovering_model_is_a_result_not_a_gap(tmp_path):
    """Down is not gone: while its runner restarts, a model is in every fan-out as MODEL_RECOVERING."""
    layout = fresh_pki(tmp_path, "steady", "fragile")
    models = {"steady": COUNTER, "fragile": COUNTER}
    async with orchestrating(layout, tmp_path, models, models_per_node=1, restart_backoff_first=2.0) as orchestrator:
        async with connected(layout, orchestrator.port) as client:
            assert await client.ready(10)
            orchestrator.runner_process("fragile").kill()
            await eventually(lambda: client.down == {"fragile": "RECOVERING"}, what="the recovery on the list")
            results = by_id(await client.call("echo", json_args(1)))
            assert results["steady"].status is CallStatus.SUCCESS
            fragile = results["fragile"]
            assert (fragile.status, fragile.reason, fragile.fault) == (
                CallStatus.FAILURE, ErrorCode.MODEL_RECOVERING, Fault.INFRASTRUCTURE)
            assert fragile.message.startswith("RECOVERING since 20") and "RUNNER_FAILED: runner ended" in fragile.message
            # Stopped on purpose: it leaves the results.
            await eventually(lambda: client.down == {}, timeout=20, what="the restart")
            assert await orchestrator.stop_model("fragile", None, "test")
            await eventually(lambda: "fragile" not in client.states, what="the stop")
            assert set(by_id(await client.call("echo", json_args(2)))) == {"steady"}


async def test_adoption_takes_only_a_runner_that_proves_it_is_the_one_launched(tmp_path):
    """A stored handle is checked: pid alive, same start time, and the runner itself naming node and deployment."""
    layout = fresh_pki(tmp_path, "alpha")
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "alpha").symlink_to(COUNTER)
    settings = LocalOrchestratorSettings(crunch_id=CRUNCH, submissions=tmp_path / "submissions", pki_dir=layout.root,
                                         base_paths=[BASE_PATH])
    settings.audit_folder.mkdir()
    launcher = ProcessLauncher(lambda: settings, tmp_path / "state")
    orphan = await launcher.start(RunnerSpec("alpha", "alpha-d0", {"alpha": COUNTER}))  # never recorded, say
    runner = await launcher.start(RunnerSpec("alpha", "alpha-d1", {"alpha": COUNTER}))
    await asyncio.wait_for(orphan.wait(), 5)  # a node's new runner never serves beside an unrecorded old one
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert (await launcher.adopt("alpha", runner.handle)).address == runner.address  # the real thing
        for handle in ({**runner.handle, "start_time": runner.handle["start_time"] + 1}, {**runner.handle, "pid": 2**22 + 1}):
            with pytest.raises(LauncherError):
                await launcher.adopt("alpha", handle)
            assert alive(runner.pid)  # another process (or none) by that pid: the runner is left alone
        with pytest.raises(LauncherError):
            await launcher.adopt("alpha", {**runner.handle, "deployment": "alpha-d0"})
        await runner.wait()  # ours (pid and start time) but not the deployment it should be: killed
        # A process that is ours by pid and start time but answers no control socket is killed too.
        imposter = {**runner.handle, "pid": sleeper.pid, "start_time": process_start_time(sleeper.pid)}
        with pytest.raises(LauncherError):
            await launcher.adopt("alpha", imposter)
        assert sleeper.wait(10) == -signal.SIGKILL
    finally:
        sleeper.kill()
        await runner.stop(0)


def test_one_orchestrator_per_state_store(tmp_path):
    """A second orchestrator over the same store would adopt and restart the same runners: refused."""
    first = StateStore(tmp_path / "orchestrator.sqlite", CRUNCH)
    with pytest.raises(ConfigError) as err:
        StateStore(tmp_path / "orchestrator.sqlite", CRUNCH)
    assert "another orchestrator" in err.value.message
    first.close()
    StateStore(tmp_path / "orchestrator.sqlite", CRUNCH).close()  # free again once the first is gone
    with pytest.raises(ConfigError):  # and never shared between crunches
        StateStore(tmp_path / "orchestrator.sqlite", "other-crunch")
