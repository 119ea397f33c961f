"""The pod profile, from the outside: `sandbox-check` run for real as an unprivileged process.

A runner in a Pod of the Kubernetes backend is what `setpriv` makes of root here: a non-root
uid and gid, no supplementary groups, no capabilities (effective, inheritable, bounding) and
no_new_privs. There `--profile pod` must report the five layers the runner still applies as
active, the four needing privileges as provided by the Pod (and say what the Pod must do),
and exit 0; `--profile host` (the default) must refuse and name the missing layers.
The interpreter may sit under a folder other users cannot enter (/root here): the check then
runs in a private mount namespace that makes only that folder's interpreter tree reachable.
Needs root, util-linux's setpriv and unshare: skipped elsewhere with the reason, failed under CI=true.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from secure_runner.runner.sandbox.policy import LAYERS, LayerResult, SandboxPolicy
from secure_runner.runner.worker import WorkerConfig

from test_sandbox import require  # skip with the reason here, fail under CI=true

POD_UID = 10001  # the Kubernetes backend's default runAsUser
POD_PROVIDED = ("cgroup", "namespaces", "filesystem", "uid")
RUNNER_APPLIED = ("environment", "rlimits", "no_new_privs", "landlock", "seccomp")
LAYER_LINE = re.compile(r"^  \[(?P<state>[^\]]+?) *\] (?P<name>\w+) ")


def _reach_interpreter() -> str:
    """Shell lines that let another uid reach the interpreter: "" when it already can."""
    path = Path(os.path.realpath(sys.executable))
    closed = [folder for folder in reversed(path.parents) if not folder.stat().st_mode & 0o001]
    if not closed:
        return ""
    require(len(closed) == 1, f"more than one folder other users cannot enter above {path}: {closed}")
    child = path.parents[path.parents.index(closed[0]) - 1]  # the entry of the closed folder on the path
    # A tmpfs open to all hides the closed folder's other entries; only the interpreter's tree comes back.
    return (f'stash=$(mktemp -d) && mount --bind {shlex.quote(str(child))} "$stash" && '
            f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(closed[0]))} && "
            f'mkdir {shlex.quote(str(child))} && mount --move "$stash" {shlex.quote(str(child))} && ')


@pytest.fixture(scope="module")
def as_pod_user():
    require(os.geteuid() == 0, "dropping to the Pod's uid needs root")
    require(shutil.which("setpriv") is not None and shutil.which("unshare") is not None, "util-linux setpriv/unshare")

    def run(*args: str) -> subprocess.CompletedProcess:
        drop = ["setpriv", f"--reuid={POD_UID}", f"--regid={POD_UID}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", sys.executable, "-m", "secure_runner.cli", *args]
        script = f"{_reach_interpreter()}cd / && exec {shlex.join(drop)}"
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=60)

    return run


def _states(report: str) -> dict[str, str]:
    return {m["name"]: m["state"] for m in map(LAYER_LINE.match, report.splitlines()) if m}


def test_pod_profile_unprivileged_applies_five_layers_and_leaves_four_to_the_pod(as_pod_user):
    result = as_pod_user("sandbox-check", "--profile", "pod")
    assert result.returncode == 0, result.stdout + result.stderr
    report = result.stdout
    assert f"runner uid {POD_UID}, profile pod)" in report, report
    assert _states(report) == {**dict.fromkeys(RUNNER_APPLIED, "active"), **dict.fromkeys(POD_PROVIDED, "by Pod")}
    assert list(_states(report)) == list(LAYERS), report
    assert "Every layer the runner must apply is active: a runner here starts with --profile pod." in report
    assert "The Pod must provide (its securityContext, NetworkPolicy and per-Pod cgroup)" in report
    assert "NetworkPolicy denying all egress" in report and "non-root runAsUser" in report, report
    assert "share its uid" in report and "PID namespace" in report and "one model per Pod" in report, report


def test_host_profile_unprivileged_refuses_naming_the_missing_layers(as_pod_user):
    result = as_pod_user("sandbox-check", "--profile", "host")
    assert result.returncode == 1, result.stdout + result.stderr
    expected = {**dict.fromkeys(RUNNER_APPLIED, "active"), **dict.fromkeys(POD_PROVIDED, "MISSING")}
    assert _states(result.stdout) == expected, result.stdout
    assert ("A runner here refuses to start unless given --allow-missing-layer cgroup,namespaces,filesystem,uid."
            in result.stdout), result.stdout
    assert "Pod" not in result.stdout, result.stdout


def test_pod_profile_still_requires_the_unprivileged_layers_in_the_worker():
    """The profile travels to the worker, which refuses to load code without a layer the runner must apply."""
    policy = WorkerConfig.from_json(WorkerConfig("/s", 1, sandbox=SandboxPolicy(profile="pod")).to_json()).sandbox
    assert policy.profile == "pod"
    layers = [LayerResult(name, name not in ("uid", "landlock"), "probe") for name in LAYERS]
    assert policy.refusal(layers) == "required sandbox layer missing: landlock (probe)"
    assert SandboxPolicy().refusal(layers) == "required sandbox layer missing: uid (probe); landlock (probe)"
    with pytest.raises(ValueError, match="unknown sandbox profile"):
        SandboxPolicy(profile="laptop")
