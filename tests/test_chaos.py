"""Chaos: 100 fan-out rounds against real runners that misbehave in every way we know.

One in-process orchestrator starts eight real runner processes (each with its sandboxed
worker) of one submission (`tests/models/chaos/actor`) that does what each call tells
it: answer, raise, return garbage, crash its worker mid-call or sleep past the timeout.
A seeded plan (SEED) picks, per round, what each faulty model does; the client's
per-model arguments carry it. Between rounds the test also kills one runner from outside
(SIGKILL; the orchestrator restarts it as a new deployment) and has the orchestrator
redeploy another; and it takes the orchestrator itself down (ORCHESTRATOR_DOWN_ROUNDS:
its supervision and server end without stopping a runner, as a killed orchestrator's
would; a real SIGKILL of an orchestrator process is tests/test_orchestrator_restart.py),
plays that round without it, then starts a new orchestrator over the same state store
and port, which adopts every runner: nothing restarts, no deployment changes.

Every round asserts: exactly one result per targeted model; the round took at most
timeout + 0.5 s; each model's status and reason are what its act implies (healthy ones
SUCCESS with their own output, faulty ones MODEL_RAISED, MODEL_OUTPUT_INVALID,
WORKER_CRASHED or MODEL_TIMEOUT, the just-killed one an infrastructure failure that
counts for nothing (down, not gone), disconnected ones MODEL_UNAVAILABLE); and a model is disconnected
exactly when the test's own count of its consecutive faults reaches a limit. Before
each round the test waits (bounded) until no model is connecting or cooling down, so
each round's outcome is a function of the seed alone and the run is reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections import Counter

from secure_runner.client.remote_model import ModelState
from secure_runner.orchestrator.local import LocalOrchestrator
from secure_runner.client.results import CallStatus, Fault
from secure_runner.errors import ErrorCode
from secure_runner.v1 import orchestrator_pb2

from conftest import MODELS, by_id, connected, eventually, free_port, fresh_pki, json_args, orchestrating

SEED = 1
ROUNDS = 100
TIMEOUT = 1.0
MAX_FAILURES = 3
MAX_TIMEOUTS = 2
HEALTHY = ("healthy-one", "healthy-two")
FAULTY = {"slow": ("sleep", 0.15), "raising": ("raise", 0.25), "garbage": ("garbage", 0.25), "crashing": ("crash", 0.2)}
KILLED, REDEPLOYED = "killed", "redeployed"
KILL_ROUNDS = frozenset({20, 50, 80})
REDEPLOY_ROUNDS = frozenset({35, 65, 95})
ORCHESTRATOR_DOWN_ROUNDS = frozenset({40, 72})
MODEL_IDS = (*HEALTHY, *FAULTY, KILLED, REDEPLOYED)
GHOST = "ghost"  # never deployed: asked for now and then
EXPECTED = {
    "ok": (CallStatus.SUCCESS, ""),
    "raise": (CallStatus.FAILURE, ErrorCode.MODEL_RAISED),
    "garbage": (CallStatus.FAILURE, ErrorCode.MODEL_OUTPUT_INVALID),
    "crash": (CallStatus.FAILURE, ErrorCode.WORKER_CRASHED),
    "sleep": (CallStatus.TIMEOUT, ErrorCode.MODEL_TIMEOUT),
}


def make_plan(seed: int) -> list[tuple[dict[str, str], list[str] | None]]:
    """Per round: each model's act, and the model ids targeted (None: every connected model)."""
    rng = random.Random(seed)
    plan = []
    for round_no in range(ROUNDS):
        acts = dict.fromkeys(MODEL_IDS, "ok")
        for model_id, (act, probability) in FAULTY.items():
            if rng.random() < probability:
                acts[model_id] = act
        if round_no % 10 == 3:
            targets = None
        elif round_no % 10 == 7:
            targets = rng.sample([*MODEL_IDS, GHOST], rng.randrange(0, 4))  # a subset; sometimes empty
        else:
            targets = [*MODEL_IDS, GHOST] if round_no % 5 == 1 else list(MODEL_IDS)
        plan.append((acts, targets))
    return plan


class Referee:
    """The test's own count of each model's consecutive faults, and when the limits drop it."""

    def __init__(self) -> None:
        self.failures = Counter()
        self.timeouts = Counter()
        self.dropped: dict[str, str] = {}  # model id -> deployment dropped

    def score(self, model_id: str, status: CallStatus, deployment_id: str) -> None:
        if status is CallStatus.SUCCESS:
            self.failures[model_id] = self.timeouts[model_id] = 0
        elif status is CallStatus.TIMEOUT:
            self.timeouts[model_id] += 1
        else:
            self.failures[model_id] += 1
        if self.failures[model_id] >= MAX_FAILURES or self.timeouts[model_id] >= MAX_TIMEOUTS:
            self.dropped[model_id] = deployment_id


async def test_chaos_rounds(tmp_path):
    plan = make_plan(SEED)
    layout = fresh_pki(tmp_path, *MODEL_IDS)  # the orchestrator's own PKI
    models = dict.fromkeys(MODEL_IDS, MODELS / "chaos" / "actor")
    referee = Referee()
    seen = Counter()
    slowest = 0.0
    # A runner per model: killing one from outside must disturb that model only. A fixed port: the
    # orchestrator that replaces a downed one is found where the client knows it.
    async with orchestrating(
        layout, tmp_path, models, models_per_node=1, restart_backoff_first=0.25, port=free_port()
    ) as first, contextlib.AsyncExitStack() as replacements:
        orchestrator = first
        async with connected(
            layout, orchestrator.port, timeout=TIMEOUT,
            max_consecutive_failures=MAX_FAILURES, max_consecutive_timeouts=MAX_TIMEOUTS,
        ) as client:
            deployments = {m.model_id: m.deployment_id for m in client.models}
            assert set(deployments) == set(MODEL_IDS)

            async def back_as_new_deployment(model_id: str) -> None:
                old = deployments[model_id]
                await eventually(
                    lambda: any(m.model_id == model_id and m.deployment_id != old for m in client.models),
                    timeout=30, what=f"{model_id} back as a new deployment",
                )
                deployments[model_id] = next(m.deployment_id for m in client.models if m.model_id == model_id)

            for round_no, (acts, targets) in enumerate(plan):
                if round_no in REDEPLOY_ROUNDS:
                    runner = orchestrator.runner_process(REDEPLOYED)
                    assert await orchestrator.redeploy(REDEPLOYED)
                    await back_as_new_deployment(REDEPLOYED)
                    assert orchestrator.runner_process(REDEPLOYED) is runner  # a fresh worker, same runner
                assert await client.ready(20), (round_no, client.states)
                orchestrator_down = round_no in ORCHESTRATOR_DOWN_ROUNDS
                if orchestrator_down:  # gone between rounds; its runners serve on
                    orchestrator.settings = dataclasses.replace(orchestrator.settings, stop_models_on_exit=False)
                    await orchestrator.stop()
                killed_now = round_no in KILL_ROUNDS
                if killed_now:  # from outside, between rounds, without telling anyone
                    process = orchestrator.runner_process(KILLED)
                    process.kill()
                    await process.wait()
                expected_targets = set(client.states) | set(client.down) if targets is None else set(targets)

                def arguments(model, acts=acts, round_no=round_no):
                    return json_args({"round": round_no, "act": acts[model.model_id]})

                started = time.monotonic()
                results = by_id(await client.call("echo", arguments, models=targets))
                elapsed = time.monotonic() - started
                slowest = max(slowest, elapsed)
                assert elapsed <= TIMEOUT + 0.5, (round_no, elapsed)
                assert set(results) == expected_targets, round_no  # one result per targeted model

                for model_id, result in results.items():
                    where = (round_no, model_id, result)
                    if model_id == GHOST or model_id in referee.dropped:
                        assert (result.status, result.reason) == (CallStatus.FAILURE, ErrorCode.MODEL_UNAVAILABLE), where
                        continue
                    if model_id == KILLED and killed_now:
                        assert result.status is CallStatus.FAILURE and result.fault is Fault.INFRASTRUCTURE, where
                        assert result.reason in (ErrorCode.UNREACHABLE, ErrorCode.MODEL_RECOVERING), where
                        seen["killed"] += 1
                        continue
                    act = acts[model_id]
                    assert (result.status, result.reason) == EXPECTED[act], where
                    assert result.deployment_id == deployments[model_id], where
                    if act == "ok":
                        assert result.output == {"round": round_no, "act": "ok"} and result.latency_us > 0, where
                    else:
                        assert result.fault is Fault.MODEL, where
                    if act == "raise":
                        assert result.message == f"ValueError: bad luck in round {round_no}", where
                    seen[act] += 1
                    referee.score(model_id, result.status, result.deployment_id)

                if killed_now:
                    await back_as_new_deployment(KILLED)
                if orchestrator_down:  # a new orchestrator over the same store adopts every runner
                    updates = client.model_list_updates
                    orchestrator = LocalOrchestrator(dataclasses.replace(first.settings, stop_models_on_exit=True))
                    await orchestrator.start()
                    replacements.push_async_callback(orchestrator.stop)
                    await eventually(lambda: client.model_list_updates > updates, timeout=20, what="the list again")
                    assert {m: orchestrator.board.get(m).deployment_id for m in deployments
                            if m not in referee.dropped} == {m: d for m, d in deployments.items() if m not in referee.dropped}
                    seen["orchestrator down"] += 1
                # Disconnected exactly when the limits say: not before, not after.
                assert set(client.states) == set(MODEL_IDS) - set(referee.dropped), (round_no, referee.dropped)

            # Every disconnect was reported, and the orchestrator stopped exactly those deployments.
            await eventually(lambda: client.pending_reports == [], what="failure reports")
            for model_id in MODEL_IDS:
                info = orchestrator.board.get(model_id)
                if model_id in referee.dropped:
                    assert (info.state, info.deployment_id) == (orchestrator_pb2.MODEL_STATE_STOPPED, referee.dropped[model_id])
                else:
                    assert info.state == orchestrator_pb2.MODEL_STATE_RUNNING
                    assert client.states[model_id] is ModelState.READY
    # The seed exercises every kind of outcome and both limits (change it, and this says if it no longer does).
    assert all(seen[act] for act in EXPECTED) and seen["killed"] == len(KILL_ROUNDS), seen
    assert seen["orchestrator down"] == len(ORCHESTRATOR_DOWN_ROUNDS), seen
    assert {"slow", "raising"} <= set(referee.dropped) and not set(HEALTHY) & set(referee.dropped), referee.dropped
    print(f"chaos: {ROUNDS} rounds, outcomes {dict(seen)}, dropped {sorted(referee.dropped)}, slowest round {slowest:.3f} s")
