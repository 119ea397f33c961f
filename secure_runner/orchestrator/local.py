"""The embedded orchestrator: a crunch's models from a folder of submissions, run by a launcher.

Each subfolder of `submissions` is one submission whose folder name is its
model id; only models present in the registry are started (their names and
cruncher come from the registry, never from the untrusted folder). Models are
packed `models_per_node` to a runner (a model node; each model still in its own
sandboxed worker); by default at most one node per CPU core, so a node's models
share its event loop instead of each paying for a process of its own. With one
model per node, the node is named after its model.

This module is the model logic, written once: packing, deployments, states,
reports, restarts, the durable store. Where a runner runs is the injected
launcher's business (orchestrator/launcher.py; the default runs local processes,
orchestrator/processes.py; orchestrator/kubernetes.py runs one Pod per node). Runner credentials come from the test PKI, or in
production mode from what the runner host and the crunchers provisioned
(`credentials_mode`, orchestrator/credentials.py).

States on the board: STARTING (a first start, or a redeploy), RUNNING,
RECOVERING (the runner died or failed to start, or the model itself is failing in
its runner; a new runner is started after a backoff that doubles with each
consecutive failure, up to `restart_backoff_max`, and resets once a runner stayed
up `stable_seconds`), STOPPED (stopped on purpose: a coordinator's failure report
or an operator). Each carries its reason and since when. Every runner started gets
a new deployment id per model, so coordinators can tell a restarted model from the
one they knew.

Runners outlive the orchestrator. Everything needed to find them again is written
to the state store (orchestrator/store.py) before it is acted on; on start, the
orchestrator adopts every runner of the store that is still alive and is verifiably
the one launched (same deployment ids, nothing restarted), starts the dead ones, and
serves the same model list. A deliberate stop stops the models only with
`stop_models_on_exit` (the library default; the CLI's default keeps them running).

One model of a node is stopped or redeployed without disturbing the others: the
orchestrator sends the runner a command on its control socket (runner/control.py)
and waits for its answer; the node's other models keep their deployments. A
runner that does not confirm a command is killed, and its node recovered as a
whole, like a runner that died. Stopping a node's last model stops the node. A launcher
that cannot control one model (`controls_models = False`: a Pod has no control socket)
gets the node's runner replaced instead, without the stopped model or with a new
deployment of the redeployed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from secure_runner import pki
from secure_runner.backoff import doubling_delay
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.log_format import log_fields
from secure_runner.metrics import MetricsEndpoint, MetricsServer, OrchestratorMetrics, serve_metrics
from secure_runner.orchestrator.credentials import CredentialsMode, RunnerCredentials, credentials_for
from secure_runner.orchestrator.launcher import (
    FAILING_STATES, UP_STATES, Launcher, LauncherError, ModelStatus, Runner, RunnerSpec,
)
from secure_runner.orchestrator.processes import ProcessLauncher
from secure_runner.orchestrator.service import ModelBoard, OrchestratorServer
from secure_runner.orchestrator.store import ModelRecord, NodeRecord, StateStore, now_ms
from secure_runner.smp.identity import validate_id
from secure_runner.v1 import orchestrator_pb2

log = logging.getLogger(__name__)

State = orchestrator_pb2.ModelState
STATE_NAMES = tuple(name.removeprefix("MODEL_STATE_") for name in State.keys() if name != "MODEL_STATE_UNSPECIFIED")
STOP_GRACE_SECONDS = 5.0
STATUS_POLL_SECONDS = 2.0  # how often each runner is asked for its models' own states
DEFAULT_PORT = 9091


@dataclass(frozen=True)
class LocalOrchestratorSettings:
    crunch_id: str
    submissions: Path
    pki_dir: Path
    base_paths: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (the CLI's default is DEFAULT_PORT)
    runner_start_timeout: float = 30.0
    runner_log_level: str = "INFO"  # INFO: the log file holds what workers write (`secure-runner models logs`)
    runner_log_format: str = "text"  # or "json": the runners' log files in the orchestrator's own --log-format
    audit_dir: Path | None = None  # default: an `audit` folder beside the PKI folder
    state_dir: Path | None = None  # default: a `state` folder beside the PKI folder (store, sockets, logs)
    # Stop every runner when the orchestrator is stopped on purpose; False leaves them serving, to be
    # adopted by the next orchestrator. A SIGKILLed orchestrator never stops them.
    stop_models_on_exit: bool = True
    # Sandbox layers the runners may start without (each runner logs it); empty: all required.
    allow_missing_layers: tuple[str, ...] = ()
    # Restart delays after consecutive runner failures: first, doubling, capped.
    restart_backoff_first: float = 0.5
    restart_backoff_max: float = 30.0
    stable_seconds: float = 30.0  # a runner up this long resets the backoff
    # Models per runner process (a model node, reached with one FanOut per call); 1: a runner per model;
    # None or 0: at most one node per CPU core (see `pack`).
    models_per_node: int | None = None
    # The chain registry's configuration (registry.chain); None: the registry file in the PKI folder.
    # The orchestrator and the runners it starts read the same source.
    chain_config: Path | None = None
    # "test-pki": this orchestrator is the CA and holds the crunchers' keys (demo, tests); "production":
    # it relays certificates and delegations the parties provisioned, and holds neither.
    credentials_mode: CredentialsMode = "test-pki"
    # Its own metrics endpoint (None: none). With one, every local runner serves its own on `metrics.host`
    # (any free port, same TLS choice), and `metrics_targets` lists them all for Prometheus (file_sd).
    metrics: MetricsEndpoint | None = None

    @property
    def metrics_targets(self) -> Path:
        """The Prometheus file_sd file of this orchestrator's and its runners' metrics endpoints."""
        return self.state_folder / "metrics-targets.json"

    @property
    def audit_folder(self) -> Path:
        return self.audit_dir or self.pki_dir.resolve().parent / "audit"

    @property
    def state_folder(self) -> Path:
        return self.state_dir or self.pki_dir.resolve().parent / "state"


def discover_submissions(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_dir() and not p.name.startswith((".", "_"))
    }


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, so a cpuset or taskset is respected)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def pack(model_ids: list[str], models_per_node: int | None, taken: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Node id -> model ids. One model per node keeps the model's own id as the node id.

    None or 0 packs ceil(models / CPU cores) per node: at most one runner per core.
    Node names in `taken` (nodes of an earlier run) are skipped.
    """
    per_node = models_per_node or max(1, math.ceil(len(model_ids) / usable_cpus()))
    if per_node <= 1:
        return {model_id: [model_id] for model_id in model_ids}
    names = (name for index in range(len(model_ids) + len(taken)) if (name := f"node-{index}") not in taken)
    return {next(names): model_ids[start : start + per_node] for start in range(0, len(model_ids), per_node)}


def _new_deployment(model_id: str) -> str:
    return f"{model_id}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class StartProgress:
    """One node had its first attempt while the orchestrator starts: what a progress line says."""

    started: int  # nodes whose first attempt is done, this one included
    total: int
    node_id: str
    model_ids: tuple[str, ...]
    up: bool  # its runner is serving
    failed: dict[str, str]  # node id -> why its first attempt failed, for every node failed so far


def _failure_of(node: _Node) -> str:
    """Why a node's runner did not start: its models' last failure (they share it)."""
    record = next((r for r in node.models.values() if r.failure_code), None)
    return f"{record.failure_code}: {record.failure_message}" if record else "not started"


@dataclass
class _Node:
    """One model node: the models it hosts now (stopped ones left), its runner and supervision."""

    node_id: str
    models: dict[str, ModelRecord]  # model id -> record, for the models deployed on it
    handle: dict = field(default_factory=dict)  # the stored runner handle, until adopted or replaced
    runner: Runner | None = None  # the last runner started or adopted (it may have ended)
    failures: int = 0  # consecutive runner failures
    stopping: bool = False  # stopped on purpose: not restarted
    restart: bool = False  # an operator asked for a fresh runner: restarted at once, not counted as a failure
    first_attempt: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    control: asyncio.Lock = field(default_factory=asyncio.Lock)  # one command to the runner at a time
    came_up: set[str] = field(default_factory=set)  # deployments whose worker its runner reported up

    def record(self, store: StateStore) -> None:
        store.put_node(NodeRecord(self.node_id, self.handle, self.failures))


class LocalOrchestrator:
    def __init__(
        self,
        settings: LocalOrchestratorSettings,
        launcher: Launcher | None = None,
        credentials: RunnerCredentials | None = None,
        progress: Callable[[StartProgress], None] | None = None,
    ) -> None:
        """`launcher` starts and finds the runners (default: local processes); `credentials` issues
        their certificates and delegations (default: per `settings.credentials_mode`); `progress`
        hears of each node's first attempt during `start` (the demo prints it)."""
        self._on_progress = progress
        self.settings = settings
        self.layout = pki.PkiLayout(settings.pki_dir)
        self.board = ModelBoard(validate_id(settings.crunch_id, "crunch id"))
        self.metrics = OrchestratorMetrics(
            lambda: [State.Name(state).removeprefix("MODEL_STATE_") for state in self.board.states()], STATE_NAMES)
        self.metrics_server: MetricsServer | None = None
        settings.audit_folder.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(settings.state_folder / "orchestrator.sqlite", settings.crunch_id)
        self.launcher = launcher or ProcessLauncher(lambda: self.settings, settings.state_folder)
        self.credentials = credentials or credentials_for(
            settings.credentials_mode, self.layout, settings.crunch_id, lambda: self.server.registry.current()
        )
        self.server = OrchestratorServer(
            self.board, self.layout, settings.audit_folder / "orchestrator.jsonl", self.stop_model, operator_control=self,
            chain_config=settings.chain_config, metrics=self.metrics,
        )
        self._nodes: dict[str, _Node] = {}
        self._node_of: dict[str, _Node] = {}  # model id -> its node (stopped models too)
        self._records: dict[str, ModelRecord] = {}
        self._started = 0
        self.port = 0

    # -- start: adopt what is alive, start the rest ----------------------------------------------

    async def start(self) -> int:
        """Serve the model list, adopt or start every runner; returns once each node had its first attempt."""
        self.port = await self.server.start(self.settings.host, self.settings.port)
        if self.settings.metrics is not None:
            try:
                self.metrics_server = serve_metrics(self.metrics.registry, self.settings.metrics, self.server.tls_files)
            except ConfigError:
                await self.server.stop(0)
                raise
            self._publish_metrics_targets()
        self._records = self.store.models()
        stored_nodes = self.store.nodes()
        new = self._new_records()
        for node_id, model_ids in pack(list(new), self.settings.models_per_node, frozenset(stored_nodes)).items():
            for model_id in model_ids:
                new[model_id].info.node_id = node_id
                self._records[model_id] = new[model_id]
        for record in self._records.values():
            node_id = record.info.node_id
            stored = stored_nodes.get(node_id, NodeRecord(node_id))
            node = self._nodes.setdefault(node_id, _Node(node_id, {}, stored.handle, failures=stored.failures))
            self._node_of[record.info.model_id] = node
            if record.info.state != State.MODEL_STATE_STOPPED:
                node.models[record.info.model_id] = record
                if not node.handle:  # nothing left running for it (it starts afresh): no stale address shown
                    record.info.state, record.info.address, record.info.state_reason = State.MODEL_STATE_STARTING, "", ""
            await self.board.put(record.info)
        nodes = [node for node in self._nodes.values() if node.models]
        for node in nodes:
            node.task = asyncio.create_task(self._supervise(node, len(nodes)))
        await asyncio.gather(*(node.first_attempt.wait() for node in nodes))
        return self.port

    def _new_records(self) -> dict[str, ModelRecord]:
        """Registered submissions the store does not know yet."""
        registry = self.server.registry.current().registry
        new = {}
        for model_id, path in discover_submissions(self.settings.submissions).items():
            if model_id in self._records:
                continue
            entry = registry.model(self.settings.crunch_id, model_id)
            if entry is None:
                log.warning("submission %s is not in the registry; not started", path)
                continue
            new[model_id] = ModelRecord(orchestrator_pb2.ModelInfo(
                model_id=model_id, model_name=entry.model_name, cruncher_id=entry.cruncher_id,
                cruncher_name=entry.cruncher_name, state=State.MODEL_STATE_STARTING, state_since_ms=now_ms(),
            ), path)
        return new

    # -- supervision of one node -------------------------------------------------------------------

    async def _supervise(self, node: _Node, total: int) -> None:
        """Keep one node's runner up: adopt it, or (re)start it with backoff when it dies or fails to start."""
        fresh = not node.handle  # no runner was left for it: its models start as new deployments
        runner = None if fresh else await self._adopt(node)
        while not node.stopping and node.models:
            if node.restart:  # asked for by an operator: new deployments, no failure counted
                node.restart, fresh = False, True
            if runner is None:
                runner = await self._start_runner(node, fresh)
            self._publish_metrics_targets()
            if not node.first_attempt.is_set():
                node.first_attempt.set()
                self._progress(node, runner, total)
            if runner is not None:
                up_since = time.monotonic()
                ended = await self._watch(node, runner)
                if node.stopping or node.restart:
                    log.info("runner of node %s (%s) stopped: %s", node.node_id, runner.address, ended)
                else:
                    log.warning("runner of node %s (%s) ended: %s", node.node_id, runner.address, ended,
                                extra=log_fields(node=node.node_id, reason=ErrorCode.RUNNER_FAILED))
                    for record in node.models.values():
                        record.fail(ErrorCode.RUNNER_FAILED, f"runner ended: {ended}")
                if time.monotonic() - up_since >= self.settings.stable_seconds:
                    node.failures = 0
                runner = None
                self._publish_metrics_targets()
            if node.stopping:
                break
            if node.restart:
                continue
            fresh = False
            node.failures += 1
            node.handle = {}
            node.record(self.store)
            delay = doubling_delay(node.failures, self.settings.restart_backoff_first, self.settings.restart_backoff_max)
            log.warning("node %s: %d consecutive failures; restarting in %.1f s", node.node_id, node.failures, delay)
            for record in node.models.values():
                if record.info.state != State.MODEL_STATE_RECOVERING:
                    await self._announce(record, State.MODEL_STATE_RECOVERING, f"{record.failure_code}: {record.failure_message}")
            await asyncio.sleep(delay)
        node.first_attempt.set()

    def _progress(self, node: _Node, runner: Runner | None, total: int) -> None:
        """One line per node once it had its first attempt; a count while many start."""
        self._started += 1
        if runner is not None:
            models = ", ".join(f"{m}={r.info.deployment_id}" for m, r in node.models.items())
            log.info("node %s: %s, deployment %s, models %s", node.node_id, runner.address, runner.deployment, models)
        failed = {n.node_id: _failure_of(n) for n in self._nodes.values() if n.first_attempt.is_set() and n.runner is None}
        if total > 1:
            log.info("started %d of %d runners%s", self._started, total,
                     f" (failed: {', '.join(sorted(failed))})" if failed else "")
        if self._on_progress is not None:
            self._on_progress(StartProgress(self._started, total, node.node_id, tuple(node.models), runner is not None,
                                            dict(sorted(failed.items()))))

    async def _adopt(self, node: _Node) -> Runner | None:
        """The runner a previous orchestrator left, if it is still ours and alive; None otherwise."""
        try:
            runner = await self.launcher.adopt(node.node_id, node.handle)
        except LauncherError as exc:
            log.warning("node %s: runner not adopted (%s); starting a new one", node.node_id, exc.message)
            for record in node.models.values():
                record.fail(exc.code, exc.message)
                await self._announce(record, State.MODEL_STATE_RECOVERING, f"{exc.code}: {exc.message}")
            return None
        node.runner = runner
        for model_id, record in node.models.items():
            log.info("adopted model %s on node %s at %s, deployment %s", model_id, node.node_id, runner.address,
                     record.info.deployment_id)
        return runner

    async def _start_runner(self, node: _Node, fresh: bool) -> Runner | None:
        """Start the node's runner as a new deployment of each model; the runner once up, else None.

        A fresh start shows STARTING with the new deployments; a recovery stays RECOVERING
        with the old ones until the new runner is up.
        """
        infos = {}
        restarted = {model_id for model_id, record in node.models.items() if record.info.deployment_id}
        for model_id, record in node.models.items():
            info = infos[model_id] = orchestrator_pb2.ModelInfo()
            info.CopyFrom(record.info)
            info.deployment_id, info.node_id, info.address = _new_deployment(model_id), node.node_id, ""
            if fresh:
                record.info = info
                await self._announce(record, State.MODEL_STATE_STARTING, "")
        spec = RunnerSpec(node.node_id, f"{node.node_id}-{secrets.token_hex(4)}",
                          {m: r.path for m, r in node.models.items()})
        try:
            cert = self.credentials.issue(node.node_id)
            for info in infos.values():
                info.runner_delegation = self.credentials.delegation(info, cert)
            launched = time.monotonic()
            runner = await self.launcher.start(spec)
            self.metrics.runner_start.observe(time.monotonic() - launched)
        except LauncherError as exc:
            log.error("node %s: %s", node.node_id, exc.message)
            for record in node.models.values():
                record.fail(exc.code, exc.message)
                self.store.put_model(record)
            return None
        if node.stopping or set(node.models) != set(infos):  # stopped, or a model stopped, while it started
            await runner.stop(STOP_GRACE_SECONDS)
            return None
        node.runner, node.handle = runner, runner.handle
        node.record(self.store)
        for model_id, record in node.models.items():
            infos[model_id].address = runner.address
            record.restarts += model_id in restarted
            record.info, record.calls = infos[model_id], None  # the new deployment's counters come with its STATUS
            await self._announce(record, State.MODEL_STATE_RUNNING, "")
            log.info("started model %s on node %s at %s, deployment %s", model_id, node.node_id, runner.address,
                     record.info.deployment_id,
                     extra=log_fields(model=model_id, node=node.node_id, deployment=record.info.deployment_id))
        return runner

    async def _watch(self, node: _Node, runner: Runner) -> str:
        """Until the runner ends (its reason returned): apply its models' own states every few seconds."""
        ending = asyncio.ensure_future(runner.wait())
        try:
            while True:
                if not node.control.locked():  # a command in progress changes what the runner hosts
                    with contextlib.suppress(LauncherError):
                        await self._apply_statuses(node, await runner.statuses())
                done, _ = await asyncio.wait({ending}, timeout=STATUS_POLL_SECONDS)
                if done:
                    return ending.result()
        finally:
            ending.cancel()

    async def _apply_statuses(self, node: _Node, statuses: dict[str, ModelStatus]) -> None:
        """A model that cannot come up in a live runner is RECOVERING with its own reason; RUNNING once it does.

        Only a model whose worker was never up since this deployment started counts (its
        submission cannot be loaded, say): a worker that crashed after serving is replaced by its
        runner at once and judged by the coordinators' calls, not flapped on the model list.
        Each model's call counters are kept for the operators' list (never on the board: they
        change with every call, and coordinators do not need them).
        """
        for model_id, record in node.models.items():
            status = statuses.get(model_id)
            if status is not None:
                record.calls = status.calls
            if status is None or record.info.state not in (State.MODEL_STATE_RUNNING, State.MODEL_STATE_RECOVERING):
                continue
            if status.state in UP_STATES:
                node.came_up.add(record.info.deployment_id)
                if record.info.state == State.MODEL_STATE_RECOVERING:
                    await self._announce(record, State.MODEL_STATE_RUNNING, "")
            elif (status.state in FAILING_STATES and record.info.deployment_id not in node.came_up
                  and record.info.state == State.MODEL_STATE_RUNNING):
                record.fail(status.code, status.message)
                log.warning("model %s on node %s at %s, deployment %s, cannot come up: %s: %s", model_id,
                            node.node_id, record.info.address, record.info.deployment_id, status.code,
                            status.message[:200], extra=log_fields(model=model_id, node=node.node_id,
                                                                   deployment=record.info.deployment_id,
                                                                   reason=status.code))
                await self._announce(record, State.MODEL_STATE_RECOVERING, f"{status.code}: {status.message}",
                                     since_ms=status.since_ms)

    def _publish_metrics_targets(self) -> None:
        """Write the metrics endpoints (this one's, each runner's) as a Prometheus file_sd file, atomically.

        Labels are only `role` and `node` (bounded by the crunch). A runner that ended, or has no
        metrics address (one of another launcher, or started before metrics were on), is left out.
        """
        if self.metrics_server is None:
            return
        host = self.settings.metrics.host
        groups = [{"targets": [f"{host}:{self.metrics_server.port}"], "labels": {"role": "orchestrator"}}]
        for node_id, node in sorted(self._nodes.items()):
            address = getattr(node.runner, "metrics_address", "")
            if address and node.runner.returncode is None:
                groups.append({"targets": [address], "labels": {"role": "runner", "node": node_id}})
        target = self.settings.metrics_targets
        partial = target.with_name(target.name + ".tmp")
        partial.write_text(json.dumps(groups, indent=1) + "\n")
        partial.replace(target)  # Prometheus never reads a half-written file

    # -- the board and the store -----------------------------------------------------------------

    async def _announce(self, record: ModelRecord, state: int, reason: str, since_ms: int = 0) -> None:
        """Give the model a state (with its reason and since when): stored first, then on the board."""
        info = orchestrator_pb2.ModelInfo()
        info.CopyFrom(record.info)
        if info.state != state or info.state_reason != reason[:500]:
            info.state_since_ms = since_ms or now_ms()
        info.state, info.state_reason = state, reason[:500]
        record.info = info
        self.store.put_model(record)
        await self.board.put(info)

    def _running(self, model_id: str, deployment_id: str | None = None) -> _Node | None:
        """The model's node if the model is up as `deployment_id` (any deployment if None)."""
        node = self._node_of.get(model_id)
        record = node.models.get(model_id) if node else None
        if record is None or record.info.state != State.MODEL_STATE_RUNNING or node.runner is None:
            return None
        if deployment_id is not None and record.info.deployment_id != deployment_id:
            return None
        return node

    # -- stopping, redeploying, restarting ----------------------------------------------------------

    async def stop_model(self, model_id: str, deployment_id: str | None, why: str = "reported by a coordinator") -> bool:
        """Stop `model_id` for good if `deployment_id` is still its current deployment (None: whichever).

        A node hosting only that model stops; on a node hosting others, the runner
        stops only that model (its STOP command) and the others carry on untouched.
        """
        node = self._running(model_id, deployment_id)
        if node is None:
            return False
        runner = node.runner
        record = node.models.pop(model_id)  # before any await: a later restart of the node leaves it out
        last = not node.models
        if last:
            node.stopping = True
        await self._announce(record, State.MODEL_STATE_STOPPED, why)
        log.info("stopped model %s on node %s at %s, deployment %s (%s)", model_id, node.node_id, record.info.address,
                 record.info.deployment_id, why,
                 extra=log_fields(model=model_id, node=node.node_id, deployment=record.info.deployment_id))
        if last:
            await runner.stop(STOP_GRACE_SECONDS)
            node.handle = {}
            node.record(self.store)
        elif not getattr(self.launcher, "controls_models", True):  # a Pod: replaced by one without the model
            await self.restart_node(node.node_id)
        else:
            await self._control(node, runner, "STOP", model_id)
        return True

    async def redeploy(self, model_id: str) -> bool:
        """Give a model a new deployment (a new id, a fresh worker) at once.

        A running model: the runner replaces only that model's worker (its REDEPLOY command), so
        the node's other models, its connections and its TLS key are untouched; the delegation
        stays valid, as it binds the model and the runner's TLS key, not the deployment. The
        model shows STARTING, then RUNNING under its new id. A stopped model goes back on its
        node, whose runner is restarted with it (the others get new deployments too).
        """
        node = self._node_of.get(model_id)
        if node is None:
            return False
        record = self._records[model_id]
        if record.info.state == State.MODEL_STATE_STOPPED:
            node.models[model_id] = record
            await self._announce(record, State.MODEL_STATE_STARTING, "redeployed")
            return await self.restart_node(node.node_id)
        if self._running(model_id) is None:
            return False
        if not getattr(self.launcher, "controls_models", True):  # a Pod: a new Pod is the new deployment
            return await self.restart_node(node.node_id)
        runner = node.runner
        info = orchestrator_pb2.ModelInfo()
        info.CopyFrom(record.info)  # the board holds the old one: never changed in place
        info.deployment_id = _new_deployment(model_id)
        record.info = info
        record.restarts += 1
        await self._announce(record, State.MODEL_STATE_STARTING, "redeployed")
        if await self._control(node, runner, "REDEPLOY", model_id):
            await self._announce(record, State.MODEL_STATE_RUNNING, "")
            log.info("redeployed model %s on node %s at %s, deployment %s", model_id, node.node_id,
                     record.info.address, record.info.deployment_id)
        return True

    async def restart_node(self, node_id: str) -> bool:
        """Replace a node's runner at once: every model it hosts gets a new deployment."""
        node = self._nodes.get(node_id)
        if node is None or not node.models:
            return False
        log.info("restarting node %s (models %s)", node_id, ", ".join(node.models))
        node.stopping = False
        if node.task is None or node.task.done():
            node.first_attempt = asyncio.Event()
            node.task = asyncio.create_task(self._supervise(node, 1))
        else:
            node.restart = True
            if node.runner is not None:
                await node.runner.stop(STOP_GRACE_SECONDS)
        await node.first_attempt.wait()
        return True

    async def _control(self, node: _Node, runner: Runner, verb: str, model_id: str) -> bool:
        """Send one command to `runner`, the node's runner, and wait for its answer; True if it was done.

        A runner that does not confirm in time is killed: its node is then recovered like
        one whose runner died. A runner already replaced is not written to.
        """
        async with node.control:
            if runner is not node.runner:
                return False
            try:
                await runner.control(verb, model_id)
                return True
            except LauncherError as exc:
                if not node.stopping:
                    log.error("%s; restarting node %s", exc.message, node.node_id)
                await runner.stop(0)
                return False

    # -- what operators and tests look at ----------------------------------------------------------

    def records(self) -> list[ModelRecord]:
        return [self._records[model_id] for model_id in sorted(self._records)]

    def node_of(self, model_id: str) -> str | None:
        node = self._node_of.get(model_id)
        return node.node_id if node else None

    async def model_logs(self, model_id: str, lines: int) -> list[str]:
        """The last `lines` lines the model's worker wrote, as its runner logged them."""
        return await self.launcher.model_logs(self._node_of[model_id].node_id, model_id, lines)

    def runner_process(self, model_id: str) -> Runner | None:
        """The last runner started or adopted for the model's node (it may have ended)."""
        return self._node_of[model_id].runner

    def consecutive_failures(self, model_id: str) -> int:
        """How many times in a row the model's runner died or failed to start."""
        return self._node_of[model_id].failures

    async def stop(self) -> None:
        """Stop serving; with `stop_models_on_exit`, stop every runner too (else they serve on, to be adopted)."""
        keep = not self.settings.stop_models_on_exit
        for node in self._nodes.values():
            node.stopping = True
        if not keep:
            runners = [node.runner for node in self._nodes.values() if node.runner is not None]
            await asyncio.gather(*(runner.stop(STOP_GRACE_SECONDS) for runner in runners))
            for node in self._nodes.values():
                node.handle = {}
                node.record(self.store)
        tasks = [node.task for node in self._nodes.values() if node.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if keep:
            alive = sorted(n.node_id for n in self._nodes.values() if n.handle)
            log.info("orchestrator stopped; runners left serving for the next one: %s", ", ".join(alive) or "none")
        await self.server.stop(0.5)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if (close := getattr(self.launcher, "close", None)) is not None:  # e.g. the Kubernetes API client
            await close()
        self.store.close()
