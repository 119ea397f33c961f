"""The launcher interface: how the orchestrator starts, finds and controls a node's runner.

The orchestrator (orchestrator/local.py) owns everything about models: packing,
deployments, states, reports, the durable store. A launcher owns only where a
runner runs and how to reach it, behind these calls, and is injected, so a second
backend (Kubernetes Pods) plugs in without touching the model logic:

    start(spec)             -> Runner     a new runner for the node, up and serving
    adopt(node_id, handle)  -> Runner     the runner a previous orchestrator started, verified ours
    Runner.wait()                         returns once the runner is gone (died, killed or stopped)
    Runner.control(verb, model_id)        STOP / REDEPLOY one model of the node (runner/control.py)
    Runner.statuses()       -> {model: ModelStatus}    each hosted model's own state, as its runner says
    Runner.stop(grace)                    stop it: the runner and every model it hosts
    model_logs(node_id, model_id, lines)  the last lines a model's worker wrote

Contract (python-tuf's fetcher style): whatever the implementation, these raise
only `LauncherError` (a RUNNER_FAILED code and a message for operators), so the
orchestrator handles one error type. `Runner.handle` is plain JSON data the store
keeps, and all `adopt` needs to find the runner again after an orchestrator restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from secure_runner.errors import ErrorCode, SecureRunnerError
from secure_runner.runner.call_stats import CallStats


class LauncherError(SecureRunnerError):
    """A runner could not be started, found, verified or controlled."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.RUNNER_FAILED, message)


@dataclass(frozen=True)
class RunnerSpec:
    """What a launcher needs to start one node's runner."""

    node_id: str
    deployment: str  # the node's deployment id: new for every runner started, answered by the runner
    models: dict[str, Path]  # model id -> submission folder


UP_STATES = frozenset({"READY", "SERVING"})  # a worker is up (runner/supervisor.py ModelState)
FAILING_STATES = frozenset({"RECOVERING", "SETUP_FAILED"})


@dataclass(frozen=True)
class ModelStatus:
    """One hosted model's own state, as its runner reports it (runner/supervisor.py ModelState)."""

    state: str
    code: str = ""  # its last failure: an ErrorCode, and a message
    message: str = ""
    since_ms: int = 0  # unix milliseconds: in this state since
    calls: CallStats | None = None  # its call counters in this deployment (None: the launcher cannot ask)


class Runner(Protocol):
    node_id: str
    deployment: str
    address: str  # host:port coordinators reach it at
    handle: dict  # JSON-serializable: what `adopt` needs

    async def wait(self) -> str: ...  # returns how it ended, for the logs
    async def control(self, verb: str, model_id: str) -> None: ...
    async def statuses(self) -> dict[str, ModelStatus]: ...
    async def stop(self, grace: float) -> None: ...


class Launcher(Protocol):
    async def start(self, spec: RunnerSpec) -> Runner: ...
    async def adopt(self, node_id: str, handle: dict) -> Runner: ...
    async def model_logs(self, node_id: str, model_id: str, lines: int) -> list[str]: ...
