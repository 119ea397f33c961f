"""Contract test of the Kubernetes backend's API use, against kmock's in-memory Kubernetes API server.

No control plane can be installed here, so this is a CONTRACT test, not a cluster test:
the real orchestrator (orchestrator/local.py) drives the real `KubernetesLauncher` over
HTTP through lightkube against KubernetesEmulator from `kmock` (a maintained Kubernetes
API mock server: objects stored in memory, served on create, get, list, watch, replace,
patch and delete). What it cannot show, and a real cluster would: label selectors
(the emulator returns every object of the namespace; the backend re-checks labels on
every object itself, which this test relies on), admission (Pod Security), scheduling,
kubelets, NetworkPolicy enforcement, garbage collection. The kubelet's part, setting a
created Pod Running and Ready with an address and counting container restarts, is played
by `kubelet_stand_in` below, which writes Pod status through the same API.

Covered: create (NetworkPolicy, registry ConfigMap, a Secret and a Pod per node),
the watch (readiness, address, crash-loop marking, deletion), adoption after an
orchestrator restart (same Pods, same deployments; a tampered Pod refused and
replaced), stop (Pod and Secret deleted) and a Pod deleted from outside (recovered).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kmock import KubernetesEmulator, Server
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret
from lightkube.resources.networking_v1 import NetworkPolicy

from secure_runner.orchestrator import kubernetes as k8s
from secure_runner.orchestrator.launcher import RunnerSpec
from secure_runner.orchestrator.local import LocalOrchestrator, LocalOrchestratorSettings
from secure_runner.v1 import orchestrator_pb2

from conftest import BASE_PATH, CRUNCH, MODELS, eventually, fresh_pki

State = orchestrator_pb2.ModelState
NAMESPACE = "crunch-ns"
MODEL_IDS = ("alpha", "beta")


ORCHESTRATOR_TOKEN = "orchestrator"  # tells the orchestrator's requests from the test's own (Authorization)
ROLE = Path(__file__).resolve().parent.parent / "deploy" / "orchestrator.yaml"
VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}


def api_client(url: str, token: str | None = None) -> AsyncClient:
    config = KubeConfig.from_dict({
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {"token": token} if token else {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": NAMESPACE}}],
        "current-context": "kmock",
    })
    return AsyncClient(config=config, namespace=NAMESPACE)


async def kubelet_stand_in(client: AsyncClient) -> None:
    """Plays the kubelet: a new Pod gets an address, Running and Ready (as its tcpSocket probe would)."""
    addresses = (f"10.0.0.{n}" for n in itertools.count(1))
    async for kind, pod in client.watch(Pod, namespace=NAMESPACE):
        if kind == "ADDED" and not (pod.status and pod.status.phase):
            await client.patch(Pod, pod.metadata.name, namespace=NAMESPACE, obj={"status": {
                "phase": "Running", "podIP": next(addresses),
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "runner", "image": "img", "imageID": "", "ready": True,
                                       "restartCount": 0}],
            }})


@pytest.fixture
async def api():
    async with KubernetesEmulator() as emulator, Server(emulator):
        for resource in ("v1/pods", "v1/secrets", "v1/configmaps", "networking.k8s.io/v1/networkpolicies"):
            emulator.resources[resource] = {"namespaced": True}  # served (empty) before any object exists
        client = api_client(str(emulator.url))
        kubelet = asyncio.create_task(kubelet_stand_in(client))
        try:
            yield emulator, client
        finally:
            kubelet.cancel()
            await asyncio.gather(kubelet, return_exceptions=True)
            await client.close()


@contextlib.asynccontextmanager
async def orchestrator_on(url: str, layout, submissions, **k8s_settings):
    settings = k8s.KubernetesSettings(namespace=NAMESPACE, image="secure-runner:test", submissions_claim="subs",
                                      **{"max_restarts": 3, "ready_timeout_seconds": 10, **k8s_settings})
    launcher = k8s.KubernetesLauncher(settings, CRUNCH, layout,
                                      client_factory=lambda: api_client(url, ORCHESTRATOR_TOKEN))
    orchestrator = LocalOrchestrator(LocalOrchestratorSettings(
        crunch_id=CRUNCH, submissions=submissions, pki_dir=layout.root, base_paths=[BASE_PATH],
        models_per_node=1, stop_models_on_exit=False, restart_backoff_first=0.05, restart_backoff_max=0.1,
    ), launcher=launcher)
    await orchestrator.start()
    try:
        yield orchestrator
    finally:
        await orchestrator.stop()


def granted_by_role() -> set[tuple[str, str, str]]:
    (role,) = [doc for doc in yaml.safe_load_all(ROLE.read_text()) if doc["kind"] == "Role"]
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


async def pods(client: AsyncClient) -> dict[str, Pod]:
    return {pod.metadata.annotations[k8s.ANNOTATION_DEPLOYMENT]: pod async for pod in client.list(Pod)}


def running(orchestrator) -> dict[str, orchestrator_pb2.ModelInfo]:
    return {r.info.model_id: r.info for r in orchestrator.records() if r.info.state == State.MODEL_STATE_RUNNING}


@pytest.fixture
def submissions(tmp_path):
    folder = tmp_path / "submissions"
    folder.mkdir()
    for model_id in MODEL_IDS:
        (folder / model_id).symlink_to(MODELS / "submissions" / "counter")
    return folder


async def test_pods_created_adopted_crash_looped_and_deleted(api, tmp_path, submissions):
    emulator, client = api
    url = str(emulator.url)
    layout = fresh_pki(tmp_path, *MODEL_IDS)

    # a Pod of node alpha that no handle names (an orchestrator died between creating it and storing it)
    stray = k8s.runner_pod(k8s.KubernetesSettings(namespace=NAMESPACE, image="x", submissions_claim="subs"), CRUNCH,
                           RunnerSpec("alpha", "alpha-00000000", {}))
    await client.create(Pod.from_dict(stray))

    # create: one Pod and Secret per node, the NetworkPolicy and the registry before them
    async with orchestrator_on(url, layout, submissions) as orchestrator:
        first = running(orchestrator)
        assert set(first) == set(MODEL_IDS)
        created = await pods(client)
        assert set(created) == {orchestrator._nodes[m].runner.deployment for m in MODEL_IDS}  # the stray one deleted
        for model_id, info in first.items():
            pod = created[orchestrator._nodes[model_id].runner.deployment]
            assert info.address == f"{pod.status.podIP}:9443"
            assert pod.metadata.labels[k8s.LABEL_NODE] == model_id
            secret = await client.get(Secret, pod.metadata.name)
            assert base64.b64decode(secret.data["tls.crt"]) == layout.runner_cert(model_id).read_bytes()
            assert base64.b64decode(secret.data["tls.key"]) == layout.runner_key(model_id).read_bytes()
        policy = await client.get(NetworkPolicy, k8s.network_policy_name(CRUNCH))
        assert policy.spec.egress == [] and policy.spec.ingress[0].ports[0].port == 9443
        registry = await client.get(ConfigMap, k8s.registry_config_map_name(CRUNCH))
        assert registry.data["registry.json"] == layout.registry.read_text()
        alpha_pod, beta_pod = (created[orchestrator._nodes[m].runner.deployment] for m in MODEL_IDS)

    # adoption after a restart: alpha's Pod is the one launched (its runner restarted 5 times while no
    # orchestrator watched: not a crash loop now); beta's was tampered with (another deployment)
    await client.patch(Pod, alpha_pod.metadata.name, obj={"status": {"containerStatuses": [
        {"name": "runner", "image": "img", "imageID": "", "ready": True, "restartCount": 5}]}})
    await client.patch(Pod, beta_pod.metadata.name, obj={"metadata": {"annotations": {
        k8s.ANNOTATION_DEPLOYMENT: "beta-forged"}}})
    async with orchestrator_on(url, layout, submissions) as orchestrator:
        second = running(orchestrator)
        assert second["alpha"].deployment_id == first["alpha"].deployment_id  # adopted, not restarted
        assert second["beta"].deployment_id != first["beta"].deployment_id  # refused and replaced
        now = await pods(client)
        assert "beta-forged" not in now, "the tampered Pod of node beta was not deleted"
        alpha = orchestrator._nodes["alpha"].runner

        # crash loop: the kubelet restarts the runner container 3 times within the window
        for restarts in (6, 7, 8):
            await client.patch(Pod, alpha.name, obj={"status": {"containerStatuses": [
                {"name": "runner", "image": "img", "imageID": "", "ready": False, "restartCount": restarts}]}})
        await eventually(lambda: orchestrator.records()[0].failure_message.count("crash loop"), what="crash loop")
        await eventually(lambda: "alpha" in running(orchestrator)
                         and running(orchestrator)["alpha"].deployment_id != second["alpha"].deployment_id,
                         what="alpha on a new Pod")
        assert alpha.deployment not in await pods(client), "the crash-looping Pod was not deleted"

        # a registry change (a revoked key, say) reaches the ConfigMap the Pods mount
        changed = layout.registry.read_text().replace('"Alpha"', '"Alpha renamed"')
        assert changed != layout.registry.read_text()
        layout.registry.write_text(changed)

        async def registry_copied() -> bool:
            return (await client.get(ConfigMap, k8s.registry_config_map_name(CRUNCH))).data["registry.json"] == changed
        for _ in range(100):
            if await registry_copied():
                break
            await asyncio.sleep(0.05)
        assert await registry_copied()

        # the model's worker output, from its Pod's log
        kmock_log = f"get /api/v1/namespaces/{NAMESPACE}/pods/{orchestrator._nodes['alpha'].runner.name}/log"
        emulator[kmock_log] << (b"2026 INFO secure_runner.runner.supervisor: model alpha: hello\n"
                                b"2026 INFO secure_runner.runner.server: other\n")
        assert await orchestrator.model_logs("alpha", 10) == [
            "2026 INFO secure_runner.runner.supervisor: model alpha: hello"]

        # a Pod deleted from outside (a drained node): recovered on a new Pod
        beta = orchestrator._nodes["beta"].runner
        await client.delete(Pod, beta.name)
        await eventually(lambda: orchestrator._nodes["beta"].runner is not beta
                         and "beta" in running(orchestrator), what="beta on a new Pod")

        # redeploy: no control socket in a Pod, so a new Pod is the new deployment; the old one is deleted
        old_pod, old_deployment = orchestrator._nodes["alpha"].runner, running(orchestrator)["alpha"].deployment_id
        failures = orchestrator.consecutive_failures("alpha")
        assert await orchestrator.redeploy("alpha")
        await eventually(lambda: "alpha" in running(orchestrator)
                         and running(orchestrator)["alpha"].deployment_id != old_deployment,
                         what="alpha redeployed on a new Pod")
        assert old_pod.name not in {pod.metadata.name async for pod in client.list(Pod)}
        assert orchestrator.consecutive_failures("alpha") == failures  # asked for, not a failure

        # a followed Pod relabelled under the orchestrator is no longer trusted: deleted and replaced
        relabelled = orchestrator._nodes["alpha"].runner
        await client.patch(Pod, relabelled.name, obj={"metadata": {"labels": {k8s.LABEL_NODE: "beta"}}})
        await eventually(lambda: orchestrator._nodes["alpha"].runner is not relabelled
                         and "alpha" in running(orchestrator), what="alpha on a new Pod")
        assert relabelled.name not in {pod.metadata.name async for pod in client.list(Pod)}

        # stop: the model's Pod and its Secret are deleted
        beta = orchestrator._nodes["beta"].runner
        assert await orchestrator.stop_model("beta", None, "operator")
        names = {pod.metadata.name async for pod in client.list(Pod)}
        secrets = {secret.metadata.name async for secret in client.list(Secret)}
        assert beta.name not in names and beta.name not in secrets

    # least privilege: every call the orchestrator made is one the operator's Role (deploy/) grants
    used = set()
    for request in emulator:
        if request.headers.get("Authorization") == f"Bearer {ORCHESTRATOR_TOKEN}" and request.resource is not None:
            verb = VERBS.get(request.action.name) or str(request.method).rpartition(".")[2].lower()  # PATCH, PUT
            used.add((request.resource.group, request.resource.plural + (f"/{request.subresource}" if request.subresource
                                                                           else ""), verb))
    assert used and used <= granted_by_role(), used - granted_by_role()


async def test_the_cli_drives_pods_with_backend_kubernetes(api, tmp_path, submissions):
    """`secure-runner orchestrator --backend kubernetes --kubernetes-settings FILE`, reaching the API by KUBECONFIG."""
    emulator, client = api
    layout = fresh_pki(tmp_path, *MODEL_IDS)
    settings = tmp_path / "kubernetes.json"
    settings.write_text(json.dumps({"namespace": NAMESPACE, "image": "secure-runner:test", "submissions_claim": "subs"}))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(emulator.url)}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": NAMESPACE}}],
    }))
    process = subprocess.Popen(
        [sys.executable, "-m", "secure_runner.cli", "orchestrator", "--crunch", CRUNCH, "--submissions",
         str(submissions), "--pki", str(layout.root), "--port", "0", "--backend", "kubernetes",
         "--kubernetes-settings", str(settings)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert line.startswith(b"READY "), (line, process.stderr.read1().decode()[-2000:] if not line else "")
        created = await pods(client)
        assert sorted(pod.metadata.labels[k8s.LABEL_NODE] for pod in created.values()) == list(MODEL_IDS)  # a Pod per model
    finally:
        process.terminate()
        assert await asyncio.to_thread(process.wait, 30) == 0
    assert len(await pods(client)) == 2  # the CLI's default: runners outlive the orchestrator


def test_the_cli_refuses_kubernetes_without_settings_or_api_configuration(tmp_path):
    layout = fresh_pki(tmp_path, "alpha")
    command = [sys.executable, "-m", "secure_runner.cli", "orchestrator", "--crunch", CRUNCH, "--submissions",
               str(tmp_path), "--pki", str(layout.root), "--backend", "kubernetes"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "--kubernetes-settings" in result.stderr
    settings = tmp_path / "kubernetes.json"
    settings.write_text(json.dumps({"namespace": NAMESPACE, "image": "i", "submissions_claim": "subs"}))
    environment = {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing")}
    environment.pop("KUBERNETES_SERVICE_HOST", None)
    result = subprocess.run([*command, "--kubernetes-settings", str(settings)], capture_output=True, text=True,
                            timeout=30, env=environment)
    assert result.returncode == 2 and "INVALID_VALUE: no Kubernetes API configuration" in result.stderr, result.stderr
