"""The Kubernetes launcher: each node's runner a hardened Pod, the cluster's objects the source of truth.

It implements the launcher interface (orchestrator/launcher.py), so the model logic
(orchestrator/local.py) is the same as for local processes. It talks to the API server
with `lightkube` (asyncio-native, typed models, watches that resume), through the
orchestrator's own ServiceAccount, and only in its namespace.

What it creates, per crunch:
- a NetworkPolicy selecting the crunch's runner Pods: no egress at all, ingress only
  on the runner port (`network_policy`), ensured before the first Pod;
- a ConfigMap holding the registry file, copied there within a second of each change
  (the kubelet then updates the mounted copy, which each runner re-reads when it
  changes, as on one host: a revocation reaches a Pod after the kubelet's sync delay);
and per runner (node), as one deployment:
- a Secret with the node's certificate and key (issued by the orchestrator's
  credentials for this deployment) and the CA certificate; never in an image;
- a Pod (`runner_pod`), hardened to Pod Security "restricted" and more: non-root,
  every capability dropped, no privilege escalation, seccomp, a read-only root,
  no ServiceAccount token, resources from the settings, an optional runtimeClassName.

Labels carry the crunch and node (`LABEL_CRUNCH`, `LABEL_NODE`), annotations the
deployment id and the models: a restarted orchestrator re-finds a node's Pod by them
(`adopt`), and a Pod of the node that no stored handle names (an orchestrator killed
between creating it and storing its handle) is deleted before a new one is made. A
followed Pod whose labels or deployment annotation change is no longer trusted: it is
marked failed and deleted.

One watch on the crunch's Pods (not polling) tells each runner when its Pod is ready,
ended or restarting. The kubelet restarts a crashed runner container in place; a Pod
restarted `max_restarts` times within `restart_window_seconds` is marked failed and
deleted (a crash loop), and the orchestrator recovers its node with its own backoff.

A Pod has no control socket the orchestrator could reach (no exec, no second
listener): `controls_models` is False, so stopping or redeploying one model replaces
the node's Pod with a new deployment (local.py). Per-model states come from the
coordinators' calls and the Pod's readiness, not from STATUS (`statuses` is empty).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.types import PatchType
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret
from lightkube.resources.networking_v1 import NetworkPolicy
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from secure_runner import pki
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.orchestrator.launcher import LauncherError, ModelStatus, RunnerSpec
from secure_runner.smp.identity import validate_id

log = logging.getLogger(__name__)

LABEL_APP = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_CRUNCH = "secure-runner.io/crunch"
LABEL_NODE = "secure-runner.io/node"
ANNOTATION_DEPLOYMENT = "secure-runner.io/deployment"
ANNOTATION_MODELS = "secure-runner.io/models"

TLS_DIR = "/etc/secure-runner/tls"
REGISTRY_DIR = "/etc/secure-runner/registry"
SUBMISSIONS_DIR = "/submissions"
STATE_DIR = "/var/lib/secure-runner"
API_ERRORS = (httpx2.HTTPError, OSError)  # lightkube's ApiError is an httpx2.HTTPStatusError
WATCH_RETRY_SECONDS = 1.0
REGISTRY_SYNC_SECONDS = 1.0  # as often as a runner on one host looks at its registry file


class KubernetesSettings(BaseModel):
    """The Kubernetes backend's settings (`--kubernetes-settings FILE.json`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str
    image: str  # the runner image (deploy/Containerfile), best pinned by digest
    submissions_claim: str  # a PersistentVolumeClaim holding the submissions folder, mounted read-only
    runtime_class: str | None = None  # e.g. "gvisor" or "kata": a VM-grade boundary around each Pod
    cpu: str = "1"  # requests = limits: a Guaranteed Pod, no noisy neighbour bursts
    memory: str = "2Gi"
    ephemeral_storage: str = "1Gi"  # /tmp and the runner's state folder (emptyDir)
    port: int = Field(9443, ge=1024, le=65535)  # the runner's gRPC port, the only one a Pod admits
    run_as_user: int = Field(10001, ge=1)
    # "RuntimeDefault", or "Localhost:<profile path under the kubelet's seccomp folder>".
    seccomp_profile: str = "RuntimeDefault"
    host_users: bool = True  # False: the Pod in a user namespace (hostUsers: false), where the cluster supports it
    max_restarts: int = Field(3, ge=1)  # container restarts within the window that mark the Pod failed
    restart_window_seconds: float = Field(600.0, gt=0)
    ready_timeout_seconds: float = Field(120.0, gt=0)  # image pull and start included
    base_paths: list[str] = []  # folders inside the image holding the game's base class
    allow_missing_layers: list[str] = []  # layers a Pod may lack beyond the pod profile's (README)


def _names(crunch_id: str, deployment: str) -> str:
    """A Pod's (and its Secret's) name: ids are DNS labels, so this is a valid object name."""
    return f"sr-{crunch_id}-{deployment}"


def registry_config_map_name(crunch_id: str) -> str:
    return f"sr-{crunch_id}-registry"


def network_policy_name(crunch_id: str) -> str:
    return f"sr-{crunch_id}-runners"


def runner_labels(crunch_id: str, node_id: str | None = None) -> dict[str, str]:
    labels = {LABEL_APP: "secure-runner", LABEL_COMPONENT: "runner", LABEL_CRUNCH: crunch_id}
    if node_id is not None:
        labels[LABEL_NODE] = node_id
    return labels


def _seccomp(profile: str) -> dict:
    kind, _, path = profile.partition(":")
    if kind == "RuntimeDefault" and not path:
        return {"type": "RuntimeDefault"}
    if kind == "Localhost" and path:
        return {"type": "Localhost", "localhostProfile": path}
    raise LauncherError(f"seccomp_profile must be RuntimeDefault or Localhost:<path>, not {profile!r}")


def runner_pod(settings: KubernetesSettings, crunch_id: str, spec: RunnerSpec) -> dict:
    """The Pod of one runner node: every hardening is here, checked field by field by the tests."""
    name = _names(crunch_id, spec.deployment)
    args = [
        "runner", "--crunch", crunch_id, "--node-id", spec.node_id,
        "--cert", f"{TLS_DIR}/tls.crt", "--key", f"{TLS_DIR}/tls.key", "--ca", f"{TLS_DIR}/ca.crt",
        "--registry", f"{REGISTRY_DIR}/registry.json",
        "--host", "0.0.0.0", "--port", str(settings.port),  # the Pod's own network namespace
        "--audit-log", f"{STATE_DIR}/audit.jsonl",
        "--profile", "pod",  # unprivileged: the Pod provides the layers needing privileges (sandbox/policy.py)
    ]
    for model_id, path in spec.models.items():
        args += ["--model", f"{model_id}={SUBMISSIONS_DIR}/{path.name}"]
    for base in settings.base_paths:
        args += ["--base-path", base]
    for layer in settings.allow_missing_layers:
        args += ["--allow-missing-layer", layer]
    resources = {"cpu": settings.cpu, "memory": settings.memory, "ephemeral-storage": settings.ephemeral_storage}
    pod_spec: dict = {
        "automountServiceAccountToken": False,  # a runner never talks to the API server
        "enableServiceLinks": False,  # no environment variables naming the namespace's services
        "restartPolicy": "Always",
        "hostUsers": settings.host_users,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": settings.run_as_user, "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user, "seccompProfile": _seccomp(settings.seccomp_profile),
        },
        "containers": [{
            "name": "runner",
            "image": settings.image,
            "args": args,
            "ports": [{"name": "grpc", "containerPort": settings.port, "protocol": "TCP"}],
            # The runner's gRPC health needs the caller's client certificate (mTLS), which a kubelet
            # probe cannot present: readiness is the port accepting connections; coordinators check
            # health over mTLS themselves.
            "readinessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 5, "failureThreshold": 3},
            "resources": {"requests": resources, "limits": resources},
            "securityContext": {
                "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
                {"name": "registry", "mountPath": REGISTRY_DIR, "readOnly": True},
                {"name": "submissions", "mountPath": SUBMISSIONS_DIR, "readOnly": True},
                {"name": "state", "mountPath": STATE_DIR},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }],
        "volumes": [
            {"name": "tls", "secret": {"secretName": name, "defaultMode": 0o440}},  # root:fsGroup, no world bits
            {"name": "registry", "configMap": {"name": registry_config_map_name(crunch_id), "defaultMode": 0o444}},
            {"name": "submissions", "persistentVolumeClaim": {"claimName": settings.submissions_claim, "readOnly": True}},
            {"name": "state", "emptyDir": {"sizeLimit": "256Mi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
        ],
    }
    if settings.runtime_class:
        pod_spec["runtimeClassName"] = settings.runtime_class
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": settings.namespace, "labels": runner_labels(crunch_id, spec.node_id),
            "annotations": {ANNOTATION_DEPLOYMENT: spec.deployment, ANNOTATION_MODELS: json.dumps(sorted(spec.models))},
        },
        "spec": pod_spec,
    }


def runner_secret(settings: KubernetesSettings, crunch_id: str, spec: RunnerSpec, files: dict[str, bytes]) -> dict:
    """The node's TLS files for one deployment: `tls.crt`, `tls.key`, `ca.crt`."""
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
        "metadata": {
            "name": _names(crunch_id, spec.deployment), "namespace": settings.namespace,
            "labels": runner_labels(crunch_id, spec.node_id), "annotations": {ANNOTATION_DEPLOYMENT: spec.deployment},
        },
        "data": {key: base64.b64encode(value).decode() for key, value in sorted(files.items())},
    }


def registry_config_map(settings: KubernetesSettings, crunch_id: str, registry: bytes) -> dict:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": registry_config_map_name(crunch_id), "namespace": settings.namespace,
                     "labels": runner_labels(crunch_id)},
        "data": {"registry.json": registry.decode()},
    }


def network_policy(settings: KubernetesSettings, crunch_id: str) -> dict:
    """The crunch's runner Pods: no egress at all (DNS included), ingress only on the runner port."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": network_policy_name(crunch_id), "namespace": settings.namespace,
                     "labels": runner_labels(crunch_id)},
        "spec": {
            "podSelector": {"matchLabels": runner_labels(crunch_id)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": settings.port}]}],
            "egress": [],
        },
    }


def _ready(pod: Pod) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _restart_count(pod: Pod) -> int:
    statuses = (pod.status.containerStatuses if pod.status else None) or []
    return sum(status.restartCount or 0 for status in statuses)


def _kube_config() -> KubeConfig:
    """How to reach the API server, found at start: a typed error now rather than at each Pod start."""
    try:
        return KubeConfig.from_env()
    except (LightkubeConfigError, OSError, ValueError) as exc:
        raise ConfigError(ErrorCode.INVALID_VALUE, f"no Kubernetes API configuration: {exc}"[:500]) from None


class PodRunner:
    """One runner Pod, followed through the launcher's watch."""

    def __init__(self, launcher: KubernetesLauncher, node_id: str, deployment: str, name: str, uid: str | None,
                 restarts_seen: int = 0) -> None:
        """`restarts_seen`: container restarts before this orchestrator followed the Pod (not counted)."""
        self.node_id = node_id
        self.deployment = deployment
        self.address = ""
        self.name = name
        self._uid = uid
        self._launcher = launcher
        self._restarts_seen = restarts_seen
        self._restart_times: list[float] = []
        self.ready = asyncio.Event()
        self._ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def handle(self) -> dict:
        return {"pod": self.name, "uid": self._uid, "deployment": self.deployment, "address": self.address}

    @property
    def ended(self) -> bool:
        return self._ended.done()

    def _end(self, why: str) -> None:
        if not self._ended.done():
            self._ended.set_result(why)
            self.ready.set()  # whoever waits for readiness learns it ended

    def on_event(self, kind: str, pod: Pod) -> None:
        """A watch event for this Pod: readiness, address, crash-loop accounting, its end."""
        if kind == "DELETED" or (pod.metadata and pod.metadata.deletionTimestamp):
            self._end("pod deleted")
            return
        phase = pod.status.phase if pod.status else None
        if phase in ("Failed", "Succeeded"):
            self._end(f"pod {phase.lower()}: {(pod.status.reason or '')[:200]}")
            return
        restarts = _restart_count(pod)
        if restarts > self._restarts_seen:
            now = time.monotonic()
            self._restart_times += [now] * (restarts - self._restarts_seen)
            self._restarts_seen = restarts
            window = self._launcher.settings.restart_window_seconds
            self._restart_times = [t for t in self._restart_times if now - t <= window]
            if len(self._restart_times) >= self._launcher.settings.max_restarts:
                self.fail(f"crash loop: {len(self._restart_times)} restarts within {window:g} s; pod marked failed")
                return
        if pod.status and pod.status.podIP:
            self.address = f"{pod.status.podIP}:{self._launcher.settings.port}"
        if _ready(pod) and self.address:
            self.ready.set()

    def fail(self, why: str) -> None:
        """Mark the Pod failed: it has ended for the orchestrator, and is deleted."""
        self._end(why)
        self._launcher.delete_soon(self)

    async def wait(self) -> str:
        return await asyncio.shield(self._ended)

    async def control(self, verb: str, model_id: str) -> None:
        raise LauncherError(f"runner {self.node_id}: a Pod takes no {verb} of one model; its Pod is replaced")

    async def statuses(self) -> dict[str, ModelStatus]:
        return {}  # no control channel into a Pod (see the module docstring)

    async def stop(self, grace: float) -> None:
        await self._launcher.delete(self, grace)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait(), max(grace, 0) + 5)
        self._end("stopped")


class KubernetesLauncher:
    """Starts, adopts, watches and deletes runner Pods of one crunch in one namespace."""

    controls_models = False  # see the module docstring: one model's STOP or REDEPLOY replaces its Pod

    def __init__(self, settings: KubernetesSettings, crunch_id: str, layout: pki.PkiLayout,
                 client_factory: Callable[[], AsyncClient] | None = None) -> None:
        self.settings = settings
        self._crunch = validate_id(crunch_id, "crunch id")
        self._layout = layout
        if client_factory is None:  # in a Pod: its ServiceAccount; elsewhere: $KUBECONFIG or ~/.kube/config
            config = _kube_config()
            client_factory = lambda: AsyncClient(config=config, namespace=settings.namespace)  # noqa: E731
        self._client_factory = client_factory
        self._client: AsyncClient | None = None
        self._runners: dict[str, PodRunner] = {}  # pod name -> runner
        self._watch: asyncio.Task | None = None
        self._policy_ensured = False
        self._policy_lock = asyncio.Lock()
        self._registry_written: bytes | None = None
        self._registry_sync: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    # -- the watch -----------------------------------------------------------------------------

    def _follow(self, runner: PodRunner) -> None:
        self._runners[runner.name] = runner
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_pods())
        if self._registry_sync is None:
            self._registry_sync = asyncio.create_task(self._sync_registry())

    async def _sync_registry(self) -> None:
        """Copy each change of the registry file to its ConfigMap (the kubelet then updates the Pods' copy)."""
        while True:
            await asyncio.sleep(REGISTRY_SYNC_SECONDS)
            try:
                await self._put_registry()
            except (*API_ERRORS, ValueError) as exc:
                log.warning("registry not copied to its ConfigMap (retrying): %r", exc)

    async def _watch_pods(self) -> None:
        """One watch on the crunch's runner Pods, resumed after any error, feeding each runner its events."""
        while self._runners:
            try:
                async for kind, pod in self.client.watch(Pod, namespace=self.settings.namespace,
                                                         labels=runner_labels(self._crunch)):
                    runner = self._runners.get(pod.metadata.name)
                    if runner is None:
                        continue
                    if self._ours(pod, runner.node_id, runner.deployment):
                        runner.on_event(kind, pod)
                    else:  # relabelled or re-annotated under us: no longer trusted as the runner launched
                        runner.fail("its labels or deployment annotation changed; pod deleted")
                    if runner.ended:
                        self._runners.pop(runner.name, None)
                    if not self._runners:
                        return
            except API_ERRORS as exc:
                log.warning("watch of runner Pods failed (%r); resuming", exc)
            await asyncio.sleep(WATCH_RETRY_SECONDS)

    def _ours(self, pod: Pod, node_id: str, deployment: str | None = None) -> bool:
        """The Pod carries this crunch's and node's labels (and the deployment, if given): checked, not assumed."""
        labels = pod.metadata.labels or {}
        annotations = pod.metadata.annotations or {}
        return (labels.get(LABEL_CRUNCH) == self._crunch and labels.get(LABEL_NODE) == node_id
                and labels.get(LABEL_APP) == "secure-runner"
                and (deployment is None or annotations.get(ANNOTATION_DEPLOYMENT) == deployment))

    # -- objects -------------------------------------------------------------------------------

    async def _create_or_update(self, kind: type, manifest: dict) -> None:
        """Create the object, or make an existing one exactly `manifest` (a JSON merge patch replaces lists)."""
        try:
            await self.client.create(kind.from_dict(manifest))
        except httpx2.HTTPStatusError as exc:
            if exc.response.status_code != 409:  # 409 Conflict: it exists
                raise
            await self.client.patch(kind, manifest["metadata"]["name"], manifest, namespace=self.settings.namespace,
                                    patch_type=PatchType.MERGE)

    async def _ensure_network_policy(self) -> None:
        """The NetworkPolicy exists, as built here, before any runner Pod (an edited one is put back)."""
        async with self._policy_lock:
            if not self._policy_ensured:
                await self._create_or_update(NetworkPolicy, network_policy(self.settings, self._crunch))
                self._policy_ensured = True

    async def _put_registry(self) -> None:
        """The registry file's content into its ConfigMap, unless it is there already."""
        registry = self._layout.registry.read_bytes()
        if registry != self._registry_written:
            await self._create_or_update(ConfigMap, registry_config_map(self.settings, self._crunch, registry))
            self._registry_written = registry

    async def _delete_node_objects(self, node_id: str, keep: str | None = None) -> None:
        """Delete the node's Pods and Secrets (but `keep`): left by an orchestrator that died mid-start."""
        labels = runner_labels(self._crunch, node_id)
        for kind in (Pod, Secret):
            async for obj in self.client.list(kind, namespace=self.settings.namespace, labels=labels):
                name = obj.metadata.name
                if name != keep and (obj.metadata.labels or {}).get(LABEL_CRUNCH) == self._crunch \
                        and (obj.metadata.labels or {}).get(LABEL_NODE) == node_id:
                    log.warning("deleting %s %s of node %s that no handle names", kind.__name__, name, node_id)
                    with contextlib.suppress(httpx2.HTTPStatusError):  # gone meanwhile
                        await self.client.delete(kind, name, namespace=self.settings.namespace, grace_period=0)

    def _tls_files(self, node_id: str) -> dict[str, bytes]:
        """The node's certificate and key as the orchestrator's credentials just issued them, and the CA."""
        return {"tls.crt": self._layout.runner_cert(node_id).read_bytes(),
                "tls.key": self._layout.runner_key(node_id).read_bytes(),
                "ca.crt": self._layout.ca_cert.read_bytes()}

    # -- the launcher interface ------------------------------------------------------------------

    async def start(self, spec: RunnerSpec) -> PodRunner:
        name = _names(self._crunch, spec.deployment)
        runner: PodRunner | None = None
        try:
            await self._ensure_network_policy()
            await self._delete_node_objects(spec.node_id)
            await self._put_registry()
            await self.client.create(Secret.from_dict(runner_secret(self.settings, self._crunch, spec,
                                                                    self._tls_files(spec.node_id))))
            created = await self.client.create(Pod.from_dict(runner_pod(self.settings, self._crunch, spec)))
            runner = PodRunner(self, spec.node_id, spec.deployment, name, created.metadata.uid)
            self._follow(runner)
            # The shared watch may have passed this Pod's first events before it was followed: read it once.
            runner.on_event("MODIFIED", await self.client.get(Pod, name, namespace=self.settings.namespace))
            await asyncio.wait_for(runner.ready.wait(), self.settings.ready_timeout_seconds)
            if runner.ended:
                raise LauncherError(f"it ended: {await runner.wait()}")
        except (*API_ERRORS, ValueError, TimeoutError, LauncherError) as exc:  # ValueError: a non-UTF-8 registry
            if runner is not None:
                await runner.stop(0)
            else:
                with contextlib.suppress(*API_ERRORS):
                    await self._delete_node_objects(spec.node_id)
            raise LauncherError(f"runner Pod {name} did not become ready: {exc!r}"[:300]) from None
        return runner

    async def adopt(self, node_id: str, handle: dict) -> PodRunner:
        """The node's Pod the handle names, if it still carries the node's labels and deployment and is running."""
        try:
            name, deployment, uid = str(handle["pod"]), str(handle["deployment"]), handle.get("uid")
        except (KeyError, TypeError) as exc:
            raise LauncherError(f"node {node_id}: unusable handle: {exc!r}") from None
        try:
            pod = await self.client.get(Pod, name, namespace=self.settings.namespace)
        except API_ERRORS as exc:
            raise LauncherError(f"node {node_id}: runner Pod {name} not found: {exc!r}"[:300]) from None
        if not self._ours(pod, node_id, deployment) or pod.metadata.uid != uid or pod.metadata.deletionTimestamp:
            raise LauncherError(f"node {node_id}: Pod {name} is not deployment {deployment} of this node")
        runner = PodRunner(self, node_id, deployment, name, uid, restarts_seen=_restart_count(pod))
        runner.on_event("ADDED", pod)
        if not runner.ready.is_set() or runner.ended:
            await runner.stop(0)
            raise LauncherError(f"node {node_id}: Pod {name} is not running and ready")
        self._follow(runner)
        return runner

    async def model_logs(self, node_id: str, model_id: str, lines: int) -> list[str]:
        """The model's worker output from the node's current Pod log (the supervisor's `model <id>:` lines)."""
        marker = f" secure_runner.runner.supervisor: model {model_id}: "
        runner = next((r for r in self._runners.values() if r.node_id == node_id), None)
        if runner is None:
            return []
        found: list[str] = []
        try:
            async for line in self.client.log(runner.name, namespace=self.settings.namespace, tail_lines=20_000):
                if marker in line:
                    found.append(line.rstrip("\n"))
        except API_ERRORS as exc:
            raise LauncherError(f"node {node_id}: logs of Pod {runner.name} unreadable: {exc!r}"[:300]) from None
        return found[-lines:]

    async def delete(self, runner: PodRunner, grace: float) -> None:
        """Delete a runner's Pod and its Secret (each already gone is fine)."""
        for kind in (Pod, Secret):
            try:
                await self.client.delete(kind, runner.name, namespace=self.settings.namespace,
                                         grace_period=int(max(grace, 0)))
            except API_ERRORS as exc:
                if not (isinstance(exc, httpx2.HTTPStatusError) and exc.response.status_code == 404):
                    log.error("could not delete %s %s: %r", kind.__name__, runner.name, exc)

    def delete_soon(self, runner: PodRunner) -> None:
        task = asyncio.create_task(self.delete(runner, 0))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop watching (the Pods serve on) and close the API client."""
        for task in (self._watch, self._registry_sync):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._client is not None:
            await self._client.close()


def load_settings(path: Path) -> KubernetesSettings:
    """The backend's settings from a JSON file; a typed error if it is unreadable or invalid."""
    try:
        return KubernetesSettings.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise ConfigError(ErrorCode.INVALID_VALUE, f"kubernetes settings {path}: {exc}"[:1000]) from None
