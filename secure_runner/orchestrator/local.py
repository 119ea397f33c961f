"""The embedded orchestrator: local runner processes for a folder of submissions.

Each subfolder of `submissions` is one submission whose folder name is its
model id; only models present in the registry are started (their names and
cruncher come from the registry, never from the untrusted folder). Models are
packed `models_per_node` to a runner process (a model node; each model still in
its own sandboxed worker); by default at most one node per CPU core, so a node's models
share its event loop instead of each paying for a process of its own. With one
model per node, the node is named after its model. Each runner gets its own
certificate for `spiffe://<crunch>/runner/<node-id>`, listens on a loopback
port of its choosing and reports it on stdout (`READY <port>`).

Each node has a supervisor that keeps its runner up and marks its models' states
on the board: STARTING (a first start, or a redeploy), RUNNING, RECOVERING (the
runner died or failed to start; a new one is started after a backoff that
doubles with each consecutive failure, up to `restart_backoff_max`, and resets
once a runner stayed up `stable_seconds`), STOPPED (stopped on purpose: a
coordinator's failure report, or shutdown). Every runner started gets a new
deployment id, so coordinators can tell a restarted model from the one they
knew. A runner that never becomes healthy only ever costs its own retries.

One model of a node is stopped or redeployed without disturbing the others:
the orchestrator sends the runner a command on its stdin (runner/control.py)
and waits for its answer; the node's other models keep their deployments. A
runner that does not confirm a command is killed, and its node recovered as a
whole, like a runner that died. Stopping a node's last model stops the node.

Standing in for the crunchers, it signs each runner's identity delegation with
the cruncher's identity key from the test PKI. That is the one thing a real
deployment must not copy: there, each cruncher signs its own delegation and the
orchestrator only relays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_runner import pki
from secure_runner.orchestrator.service import ModelBoard, OrchestratorServer
from secure_runner.runner.server import RunnerSettings
from secure_runner.runner.supervisor import HELLO_TIMEOUT_SECONDS
from secure_runner.smp.identity import validate_id
from secure_runner.smp.token import issue_delegation
from secure_runner.transport import tls
from secure_runner.v1 import orchestrator_pb2

log = logging.getLogger(__name__)

State = orchestrator_pb2.ModelState
STOP_GRACE_SECONDS = 5.0
# A runner confirms a control command within this, or is killed. A stop first lets the model's
# call in progress end, which the runner cuts off at its longest call (the runners here run with
# their default); a redeploy then starts a worker, which reports within the hello timeout.
CONTROL_TIMEOUT_SECONDS = RunnerSettings.model_fields["max_call_seconds"].default + HELLO_TIMEOUT_SECONDS


@dataclass(frozen=True)
class LocalOrchestratorSettings:
    crunch_id: str
    submissions: Path
    pki_dir: Path
    base_paths: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    runner_start_timeout: float = 30.0
    runner_log_level: str = "WARNING"
    audit_dir: Path | None = None  # default: an `audit` folder beside the PKI folder
    # Sandbox layers the runners may start without (each runner logs it); empty: all required.
    allow_missing_layers: tuple[str, ...] = ()
    # Restart delays after consecutive runner failures: first, doubling, capped.
    restart_backoff_first: float = 0.5
    restart_backoff_max: float = 30.0
    stable_seconds: float = 30.0  # a runner up this long resets the backoff
    # Models per runner process (a model node, reached with one FanOut per call); 1: a runner per model;
    # None or 0: at most one node per CPU core (see `pack`).
    models_per_node: int | None = None

    @property
    def audit_folder(self) -> Path:
        return self.audit_dir or self.pki_dir.resolve().parent / "audit"


def discover_submissions(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_dir() and not p.name.startswith((".", "_"))
    }


def restart_delay(failures: int, first: float, cap: float) -> float:
    """Delay before restarting a runner after `failures` consecutive failures (>= 1)."""
    return min(first * 2 ** (failures - 1), cap)


def sign_delegation(
    layout: pki.PkiLayout, crunch_id: str, info: orchestrator_pb2.ModelInfo, cert: x509.Certificate
) -> bytes:
    """The cruncher's delegation of `info`'s model to the TLS key of `cert`, signed with its key from `layout`."""
    if not info.cruncher_id:
        log.warning("model %s has no cruncher identity; clients will refuse it", info.model_id)
        return b""
    return issue_delegation(
        pki.load_signing_key(layout.cruncher_identity(info.cruncher_id)),
        crunch_id=crunch_id,
        model_id=info.model_id,
        spki_sha256=tls.spki_sha256(cert.public_bytes(Encoding.DER)),
        now=int(time.time()),
        lifetime=int((cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()),
    )


@dataclass
class _Node:
    """One runner process (a model node) and its supervision: the models it hosts, their deployments."""

    node_id: str
    paths: dict[str, Path]  # model id -> submission folder
    infos: dict[str, orchestrator_pb2.ModelInfo]  # model id -> current (or last) deployment as announced
    proc: asyncio.subprocess.Process | None = None
    failures: int = 0  # consecutive runner failures
    stopping: bool = False  # stopped on purpose: not restarted
    first_attempt: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    control: asyncio.Lock = field(default_factory=asyncio.Lock)  # one command to the runner at a time


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, so a cpuset or taskset is respected)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def pack(model_ids: list[str], models_per_node: int | None) -> dict[str, list[str]]:
    """Node id -> model ids. One model per node keeps the model's own id as the node id.

    None or 0 packs ceil(models / CPU cores) per node: at most one runner per core.
    """
    per_node = models_per_node or max(1, math.ceil(len(model_ids) / usable_cpus()))
    if per_node <= 1:
        return {model_id: [model_id] for model_id in model_ids}
    return {
        f"node-{index}": model_ids[start : start + per_node]
        for index, start in enumerate(range(0, len(model_ids), per_node))
    }


def _next_deployment(current: orchestrator_pb2.ModelInfo) -> orchestrator_pb2.ModelInfo:
    """A copy of `current` with a new deployment id."""
    info = orchestrator_pb2.ModelInfo()
    info.CopyFrom(current)
    info.deployment_id = f"{info.model_id}-{secrets.token_hex(4)}"
    return info


class LocalOrchestrator:
    def __init__(self, settings: LocalOrchestratorSettings) -> None:
        self.settings = settings
        self.layout = pki.PkiLayout(settings.pki_dir)
        self.board = ModelBoard(validate_id(settings.crunch_id, "crunch id"))
        settings.audit_folder.mkdir(parents=True, exist_ok=True)
        self.server = OrchestratorServer(
            self.board, self.layout, settings.audit_folder / "orchestrator.jsonl", self.stop_model
        )
        self._nodes: dict[str, _Node] = {}
        self._node_of: dict[str, _Node] = {}  # model id -> its node
        self.port = 0

    async def start(self) -> int:
        """Serve the model list and start every runner; returns once each had its first start attempt."""
        self.port = await self.server.start(self.settings.host, self.settings.port)
        registry = self.server.registry.current()
        found: dict[str, tuple[Path, orchestrator_pb2.ModelInfo]] = {}
        for model_id, path in discover_submissions(self.settings.submissions).items():
            entry = registry.model(self.settings.crunch_id, model_id)
            if entry is None:
                log.warning("submission %s is not in the registry; not started", path)
                continue
            found[model_id] = path, orchestrator_pb2.ModelInfo(
                model_id=model_id,
                model_name=entry.model_name,
                cruncher_id=entry.cruncher_id,
                cruncher_name=entry.cruncher_name,
            )
        for node_id, model_ids in pack(list(found), self.settings.models_per_node).items():
            node = self._nodes[node_id] = _Node(
                node_id, {m: found[m][0] for m in model_ids}, {m: found[m][1] for m in model_ids}
            )
            self._node_of.update(dict.fromkeys(model_ids, node))
            node.task = asyncio.create_task(self._supervise(node))
        await asyncio.gather(*(node.first_attempt.wait() for node in self._nodes.values()))
        return self.port

    async def _supervise(self, node: _Node) -> None:
        """Keep one node's runner up: restart it with backoff when it dies or fails to start."""
        announce = True  # a first start shows as STARTING; a recovery stays RECOVERING
        while not node.stopping and node.paths:
            up_since = None
            try:
                up_since = await self._start_runner(node, announce)
            except Exception:  # noqa: BLE001 - one node's trouble must not end its supervision
                log.exception("starting the runner for %s failed", node.node_id)
            finally:
                node.first_attempt.set()
            if up_since is not None:
                code = await node.proc.wait()
                log.warning("runner %s exited with %s", node.node_id, code)
                if time.monotonic() - up_since >= self.settings.stable_seconds:
                    node.failures = 0
            if node.stopping:
                await self._put_states(node, State.MODEL_STATE_STOPPED)
                return
            announce = False
            node.failures += 1
            delay = restart_delay(node.failures, self.settings.restart_backoff_first, self.settings.restart_backoff_max)
            log.warning("runner %s: %d consecutive failures; restarting in %.1f s", node.node_id, node.failures, delay)
            await self._put_states(node, State.MODEL_STATE_RECOVERING)
            await asyncio.sleep(delay)
        node.first_attempt.set()

    async def _start_runner(self, node: _Node, announce: bool) -> float | None:
        """Start the node's runner as a new deployment of each model; its start time once RUNNING, else None."""
        infos = {}
        for model_id, current in node.infos.items():
            info = infos[model_id] = _next_deployment(current)
            info.node_id = node.node_id
            info.address = ""
        if announce:
            node.infos = infos
            await self._put_states(node, State.MODEL_STATE_STARTING)
        cert = pki.issue_runner_certificate(self.layout, node.node_id, crunch_id=self.settings.crunch_id)
        for info in infos.values():
            info.runner_delegation = self._sign_delegation(info, cert)
        proc = node.proc = await asyncio.create_subprocess_exec(
            *self._runner_command(node), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.settings.runner_start_timeout)
            word, port = line.decode().split()
            if word != "READY" or node.stopping:
                raise ValueError(line)
        except (TimeoutError, ValueError):
            log.error("runner %s did not become ready", node.node_id)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return None
        for info in infos.values():
            info.address = f"{self.settings.host}:{int(port)}"
        node.infos = infos
        await self._put_states(node, State.MODEL_STATE_RUNNING)
        return time.monotonic()

    def _runner_command(self, node: _Node) -> list[str]:
        command = [
            sys.executable, "-m", "secure_runner.cli", "runner",
            "--crunch", self.settings.crunch_id,
            "--node-id", node.node_id,
            "--pki", str(self.layout.root),
            "--host", self.settings.host,
            "--port", "0",
            "--log-level", self.settings.runner_log_level,
            "--audit-log", str(self.settings.audit_folder / f"runner-{node.node_id}.jsonl"),
            "--exit-with-parent",
            "--control-stdin",
        ]
        for model_id, path in node.paths.items():
            command += ["--model", f"{model_id}={path.resolve()}"]
        for base in self.settings.base_paths:
            command += ["--base-path", str(base.resolve())]
        for layer in self.settings.allow_missing_layers:
            command += ["--allow-missing-layer", layer]
        return command

    async def _put_states(self, node: _Node, state: int) -> None:
        for info in node.infos.values():
            await self._put_state(info, state)

    async def _put_state(self, info: orchestrator_pb2.ModelInfo, state: int) -> None:
        updated = orchestrator_pb2.ModelInfo()
        updated.CopyFrom(info)
        updated.state = state
        await self.board.put(updated)

    def _sign_delegation(self, info: orchestrator_pb2.ModelInfo, cert: x509.Certificate) -> bytes:
        return sign_delegation(self.layout, self.settings.crunch_id, info, cert)

    def _running(self, model_id: str, deployment_id: str | None = None) -> _Node | None:
        """The model's node if the model is up as `deployment_id` (any deployment if None)."""
        node = self._node_of.get(model_id)
        info = self.board.get(model_id)
        if node is None or info is None or info.state != State.MODEL_STATE_RUNNING:
            return None
        if deployment_id is not None and info.deployment_id != deployment_id:
            return None
        return node

    async def stop_model(self, model_id: str, deployment_id: str) -> bool:
        """Stop `model_id` for good if `deployment_id` is still its current deployment.

        A node hosting only that model stops; on a node hosting others, the runner
        stops only that model (its STOP command) and the others carry on untouched.
        """
        node = self._running(model_id, deployment_id)
        if node is None:
            return False
        proc = node.proc
        info = node.infos.pop(model_id)  # before any await: a later restart of the node leaves it out
        del node.paths[model_id]
        last = not node.paths
        if last:
            node.stopping = True
        await self._put_state(info, State.MODEL_STATE_STOPPED)
        if last:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        else:
            await self._control(node, proc, "STOP", model_id)
        return True

    async def redeploy(self, model_id: str) -> bool:
        """Give a running model a new deployment (a new id, a fresh worker) at once.

        The runner replaces only that model's worker (its REDEPLOY command), so the
        node's other models, its connections and its TLS key are untouched; the
        delegation stays valid, as it binds the model and the runner's TLS key,
        not the deployment. The model shows STARTING, then RUNNING under its new id.
        """
        node = self._running(model_id)
        if node is None:
            return False
        proc = node.proc
        info = node.infos[model_id] = _next_deployment(node.infos[model_id])
        await self._put_state(info, State.MODEL_STATE_STARTING)
        if await self._control(node, proc, "REDEPLOY", model_id):
            await self._put_state(info, State.MODEL_STATE_RUNNING)
        return True

    async def _control(self, node: _Node, proc: asyncio.subprocess.Process, verb: str, model_id: str) -> bool:
        """Send one command to `proc`, the node's runner, and wait for its answer; True if it was done.

        A runner that does not confirm in time is killed: its node is then recovered like
        one whose runner died. A runner already replaced is not written to.
        """
        async with node.control:
            if proc is not node.proc:
                return False
            try:
                proc.stdin.write(f"{verb} {model_id}\n".encode())
                await proc.stdin.drain()
                answer = await asyncio.wait_for(proc.stdout.readline(), CONTROL_TIMEOUT_SECONDS)
            except (ConnectionError, TimeoutError) as exc:
                answer = repr(exc).encode()
            if answer.split() == [b"OK", verb.encode(), model_id.encode()]:
                return True
            if not node.stopping:
                log.error("runner %s: %s %s not confirmed (%r); restarting it", node.node_id, verb, model_id, answer[:200])
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return False

    def runner_process(self, model_id: str) -> asyncio.subprocess.Process:
        return self._node_of[model_id].proc

    def consecutive_failures(self, model_id: str) -> int:
        """How many times in a row the model's runner died or failed to start."""
        return self._node_of[model_id].failures

    async def stop(self) -> None:
        for node in self._nodes.values():
            node.stopping = True
            if node.proc is not None and node.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    node.proc.terminate()
        for node in self._nodes.values():
            if node.proc is None:
                continue
            try:
                await asyncio.wait_for(node.proc.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                node.proc.kill()
                await node.proc.wait()
        tasks = [node.task for node in self._nodes.values() if node.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.server.stop(0.5)
