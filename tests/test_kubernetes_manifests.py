"""Every object the Kubernetes backend creates: valid against the Kubernetes API schema, and hardened.

`kubernetes-validate --strict` (offline OpenAPI schemas of a current Kubernetes release)
rejects unknown and misspelled fields, so a hardening field the API server would silently
drop fails here. Then each hardening rule of the Pod Security "restricted" profile and of
this project (SECURITY.md, K-rules) is checked field by field on the objects as built.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from secure_runner.orchestrator import kubernetes as k8s
from secure_runner.orchestrator.launcher import RunnerSpec

KUBERNETES_VERSION = "1.37.0"  # the newest schema kubernetes-validate ships (checked below)
CRUNCH = "test-crunch"
SPEC = RunnerSpec("node-0", "node-0-0123abcd", {"alpha": Path("/srv/submissions/alpha"),
                                                 "beta": Path("/srv/submissions/beta")})
SETTINGS = k8s.KubernetesSettings(
    namespace="crunch-ns", image="registry.example/secure-runner@sha256:" + "0" * 64, submissions_claim="subs",
    runtime_class="gvisor", cpu="500m", memory="1Gi", host_users=False,
    allow_missing_layers=["cgroup", "namespaces", "filesystem", "uid"],
)
TLS = {"tls.crt": b"CERT", "tls.key": b"-----BEGIN PRIVATE KEY-----\nKEY", "ca.crt": b"CA"}


def created_objects(settings: k8s.KubernetesSettings = SETTINGS) -> list[dict]:
    return [
        k8s.runner_pod(settings, CRUNCH, SPEC),
        k8s.runner_secret(settings, CRUNCH, SPEC, TLS),
        k8s.registry_config_map(settings, CRUNCH, b'{"crunches": []}'),
        k8s.network_policy(settings, CRUNCH),
    ]


def test_the_schema_is_a_current_kubernetes_release():
    assert kubernetes_validate.latest_version() == KUBERNETES_VERSION


@pytest.mark.parametrize("settings", [
    SETTINGS,
    SETTINGS.model_copy(update={"runtime_class": None, "host_users": True, "seccomp_profile": "Localhost:secure-runner.json"}),
], ids=["gvisor-userns", "localhost-seccomp"])
def test_every_object_validates_strictly(settings):
    for obj in created_objects(settings):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_a_misspelled_hardening_field():
    """The validator is not vacuous: a field the API server would drop fails."""
    pod = copy.deepcopy(k8s.runner_pod(SETTINGS, CRUNCH, SPEC))
    pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True  # capital S: no such field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_pod_meets_pod_security_restricted_and_more():
    pod = k8s.runner_pod(SETTINGS, CRUNCH, SPEC)
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert not spec.get("initContainers") and not spec.get("ephemeralContainers")
    # restricted: no host namespaces, no host paths, no privileged, non-root, no escalation, caps, seccomp
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(host)
    assert all(set(volume) & {"secret", "configMap", "persistentVolumeClaim", "emptyDir"} for volume in spec["volumes"])
    assert not any("hostPath" in volume for volume in spec["volumes"])
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}  # nothing added back
    assert context["runAsNonRoot"] is True
    assert "ports" not in container or all("hostPort" not in p for p in container["ports"])
    # this project's own rules
    assert context["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert spec["runtimeClassName"] == "gvisor" and spec["hostUsers"] is False
    expected = {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "1Gi"}
    assert container["resources"] == {"requests": expected, "limits": expected}
    assert container["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert [p["containerPort"] for p in container["ports"]] == [SETTINGS.port]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[k8s.SUBMISSIONS_DIR]["readOnly"] and mounts[k8s.TLS_DIR]["readOnly"]
    assert {v["name"]: v for v in spec["volumes"]}["submissions"]["persistentVolumeClaim"]["readOnly"] is True
    # identity: labels name the crunch and node, annotations the deployment and models
    assert pod["metadata"]["labels"][k8s.LABEL_CRUNCH] == CRUNCH and pod["metadata"]["labels"][k8s.LABEL_NODE] == "node-0"
    assert pod["metadata"]["annotations"][k8s.ANNOTATION_DEPLOYMENT] == SPEC.deployment
    assert json.loads(pod["metadata"]["annotations"][k8s.ANNOTATION_MODELS]) == ["alpha", "beta"]
    assert "--model" in container["args"] and "alpha=/submissions/alpha" in container["args"]


def test_optional_fields_are_absent_when_not_asked_for():
    spec = k8s.runner_pod(SETTINGS.model_copy(update={"runtime_class": None}), CRUNCH, SPEC)["spec"]
    assert "runtimeClassName" not in spec


def test_an_unknown_seccomp_profile_is_refused():
    with pytest.raises(k8s.LauncherError):
        k8s.runner_pod(SETTINGS.model_copy(update={"seccomp_profile": "Unconfined"}), CRUNCH, SPEC)


def test_the_private_key_is_only_in_the_secret():
    pod, secret, config_map, policy = created_objects()
    for obj in (pod, config_map, policy):
        assert "PRIVATE KEY" not in json.dumps(obj)
    assert base64.b64decode(secret["data"]["tls.key"]) == TLS["tls.key"]
    assert secret["immutable"] is True
    (tls_volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "tls"]
    assert tls_volume["secret"]["secretName"] == secret["metadata"]["name"] == pod["metadata"]["name"]
    assert tls_volume["secret"]["defaultMode"] & 0o007 == 0  # no world bits on the key file


def test_network_policy_denies_all_egress_and_admits_only_the_runner_port():
    pod, _secret, _config_map, policy = created_objects()
    spec = policy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and spec["egress"] == []
    assert spec["ingress"] == [{"ports": [{"protocol": "TCP", "port": SETTINGS.port}]}]
    selector = spec["podSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()  # it selects the runner Pods


def test_settings_refuse_unknown_keys(tmp_path):
    path = tmp_path / "k8s.json"
    path.write_text(json.dumps({"namespace": "n", "image": "i", "submissions_claim": "c", "privileged": True}))
    with pytest.raises(k8s.ConfigError):
        k8s.load_settings(path)


REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def test_the_shipped_seccomp_profile_denies_what_a_runner_never_needs():
    """deploy/seccomp/secure-runner.json (the Localhost option; enforced by runc in test_kubernetes_runc.py)."""
    profile = json.loads((DEPLOY / "seccomp" / "secure-runner.json").read_text())
    denied = {name for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ERRNO" and "args" not in rule
              for name in rule["names"]}
    assert {"ptrace", "mount", "unshare", "setns", "bpf", "keyctl", "io_uring_setup", "userfaultfd", "perf_event_open",
            "kexec_load", "init_module", "open_by_handle_at", "clone3"} <= denied
    clone_flags = {rule["args"][0]["value"] for rule in profile["syscalls"] if rule["names"] == ["clone"]}
    assert clone_flags == {0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000}


def test_the_image_recipe_is_non_root_without_compilers_or_secrets():
    lines = [line.strip() for line in (DEPLOY / "Containerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    final_stage = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM")):]
    copied = {word for line in lines if line.startswith("COPY") and "--from=" not in line for word in line.split()[1:-1]}
    assert copied == {"pyproject.toml", "README.md", "secure_runner"}  # never pki/ or any key
    users = [line.split()[1] for line in final_stage if line.startswith("USER")]
    assert users and all(int(part) > 0 for part in users[-1].split(":"))
    assert not any(word in line for line in final_stage for word in ("gcc", "g++", "clang", "build-essential",
                                                                     "python3-dev", "pip install"))
    assert not any(word in line.upper() for line in lines if line.startswith(("ENV", "ARG"))
                   for word in ("KEY", "SECRET", "PASSWORD", "TOKEN"))


def test_what_the_operator_applies_validates_and_is_hardened():
    documents = list(yaml.safe_load_all((DEPLOY / "orchestrator.yaml").read_text()))
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    by_kind = {document["kind"]: document for document in documents}
    assert by_kind["ServiceAccount"]["automountServiceAccountToken"] is False
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"]["type"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                            "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert by_kind["Deployment"]["spec"]["replicas"] == 1  # one orchestrator per state store
    settings = k8s.KubernetesSettings.model_validate_json(by_kind["ConfigMap"]["data"]["kubernetes.json"])
    assert settings.namespace == by_kind["Role"]["metadata"]["namespace"]
    # the Role stays in its namespace and grants nothing cluster-wide or on other kinds
    assert not any(kind in by_kind for kind in ("ClusterRole", "ClusterRoleBinding"))
    assert {r for rule in by_kind["Role"]["rules"] for r in rule["resources"]} == {
        "pods", "pods/log", "secrets", "configmaps", "networkpolicies"}
