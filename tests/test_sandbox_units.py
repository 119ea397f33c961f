"""The sandbox's own pieces, each exercised for real in a throwaway child process.

The hand-written syscall wrappers (`runner/sandbox/syscalls.py`) and the cgroup
code run against the kernel here, never mocked; they need root (skipped with a
reason elsewhere, a failure under CI=true).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secure_runner.runner.sandbox import cgroups
from secure_runner.runner.sandbox.policy import LAYERS, LayerResult, SandboxPolicy, WorkerLimits
from secure_runner.runner.supervisor import BACKOFF_MAX_SECONDS, backoff_seconds

from test_sandbox import require

ROOT_ONLY = "needs root (namespaces, mounts, cgroups)"


def _run_child(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


SYSCALLS_CHILD = r"""
import errno, json, os, socket, sys
from secure_runner.runner.sandbox import syscalls as s
out = {}
s.unshare(s.CLONE_NEWNS | s.CLONE_NEWUTS)
socket.sethostname("unit-sandbox")
out["hostname"] = socket.gethostname()
s.mount(None, "/", None, s.MS_REC | s.MS_PRIVATE)
root = sys.argv[1]
s.mount("tmpfs", root, "tmpfs", s.MS_NOSUID | s.MS_NODEV, "mode=0755,size=1m")
os.makedirs(root + "/ro")
s.mount(sys.argv[2], root + "/ro", None, s.MS_BIND)
s.mount(None, root + "/ro", None, s.MS_REMOUNT | s.MS_BIND | s.MS_RDONLY)
try:
    open(root + "/ro/new", "w")
except OSError as exc:
    out["write_ro"] = errno.errorcode[exc.errno]
try:
    s.mount(None, root + "/missing", None, s.MS_BIND)
except OSError as exc:
    out["bad_mount"] = errno.errorcode[exc.errno]
os.makedirs(root + "/old")
s.pivot_root(root, root + "/old")
os.chdir("/")
s.umount2("/old", s.MNT_DETACH)
os.rmdir("/old")
out["root"] = sorted(os.listdir("/"))
out["nnp_before"] = s.prctl(s.PR_GET_NO_NEW_PRIVS)
s.prctl(s.PR_SET_NO_NEW_PRIVS, 1)
out["nnp_after"] = s.prctl(s.PR_GET_NO_NEW_PRIVS)
print(json.dumps(out))
"""


def test_syscall_wrappers_work_and_stay_private(tmp_path):
    require(os.geteuid() == 0, ROOT_ONLY)
    (tmp_path / "build").mkdir()
    (tmp_path / "source").mkdir()
    host_name = socket.gethostname()
    out = _run_child(SYSCALLS_CHILD, str(tmp_path / "build"), str(tmp_path / "source"))
    assert out == {
        "hostname": "unit-sandbox",
        "write_ro": "EROFS",
        "bad_mount": "ENOENT",
        "root": ["ro"],
        "nnp_before": 0,
        "nnp_after": 1,
    }
    # Nothing leaked to the host: its hostname, and its view of the build dir, are unchanged.
    assert socket.gethostname() == host_name
    assert list((tmp_path / "build").iterdir()) == []


JOIN_CHILD = r"""
import json, os, sys, time
from secure_runner.runner.sandbox import cgroups
from secure_runner.runner.sandbox.policy import WorkerLimits
cgroups.join(sys.argv[1:], WorkerLimits(), "")
if os.fork() == 0:  # a grandchild that leaves the process group: only the cgroup still holds it
    os.setsid()
    time.sleep(600)
    os._exit(0)
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.read()  # wait for the parent
blocks = [bytearray(16 << 20) for _ in range(64)]  # 1 GiB, in 16 MiB blocks: over the limit
for block in blocks:
    block[::4096] = b"x" * len(block[::4096])
"""


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever adopted it."""
    for _ in range(100):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_worker_cgroup_limits_memory_and_is_cleaned_up():
    require(os.geteuid() == 0, ROOT_ONLY)
    try:
        group = cgroups.WorkerCgroup.create("unit", WorkerLimits(memory_bytes=96 << 20, pids=8))
    except cgroups.CgroupUnavailable as exc:
        require(False, str(exc))
    child = subprocess.Popen(
        [sys.executable, "-c", JOIN_CHILD, *group.procs_files], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        json.loads(child.stdout.readline())
        assert group.contains(child.pid)
        members = cgroups._pids(group.directories[0][1])
        assert len(members) == 2  # the child and its setsid grandchild
        child.stdin.close()
        assert child.wait(30) == -signal.SIGKILL  # the OOM killer, not us
        assert group.oom_kills() >= 1
        assert group.oom_kills() == 0  # counted once
        grandchild = next(pid for pid in members if pid != child.pid)
        os.kill(grandchild, 0)  # still alive after its parent died...
    finally:
        group.remove()
    assert _dead(grandchild)  # ...and killed with the cgroup
    assert all(not directory.exists() for _h, directory in group.directories)
    cgroups.remove_runner_dirs()


def test_worker_cgroups_get_equal_cpu_weights_and_their_quota():
    """Each worker is its own CFS group with the same weight (fair between the workers of a node,
    whatever threads each runs), and keeps its quota."""
    require(os.geteuid() == 0, ROOT_ONLY)
    groups = [cgroups.WorkerCgroup.create(f"unit-cpu-{n}", WorkerLimits(cpu_cores=0.5)) for n in range(2)]
    files = {1: ("cpu.shares", "cpu.cfs_quota_us"), 2: ("cpu.weight", "cpu.max")}
    try:
        seen = [
            (hierarchy.version, *((directory / name).read_text().split()[0] for name in files[hierarchy.version]))
            for group in groups for hierarchy, directory in group.directories if "cpu" in hierarchy.controllers
        ]
        require(len(seen) == 2, "no cpu controller in a cgroup hierarchy of this process")
        weight = {1: "1024", 2: "100"}[seen[0][0]]
        assert seen == [(seen[0][0], weight, str(cgroups.CPU_PERIOD_US // 2))] * 2
    finally:
        for group in groups:
            group.remove()
        cgroups.remove_runner_dirs()


def test_a_runners_cgroup_weighs_as_many_tasks_as_it_has_workers():
    """Under contention a node's models get what as many processes would: a node of 25 models must
    not weigh what one process of the host weighs (nor more than a one-model node per model)."""
    require(os.geteuid() == 0, ROOT_ONLY)
    groups = [cgroups.WorkerCgroup.create(f"unit-weight-{n}", WorkerLimits()) for n in range(3)]
    weight = {1: ("cpu.shares", cgroups.CPU_SHARES_V1), 2: ("cpu.weight", cgroups.CPU_WEIGHT_V2)}

    def node_weights() -> list[int]:
        return [
            int((directory.parent / weight[hierarchy.version][0]).read_text()) // weight[hierarchy.version][1]
            for hierarchy, directory in groups[0].directories if "cpu" in hierarchy.controllers
        ]

    try:
        require(node_weights(), "no cpu controller in a cgroup hierarchy of this process")
        assert set(node_weights()) == {3}
        groups.pop().remove()
        assert set(node_weights()) == {2}
    finally:
        for group in groups:
            group.remove()
        cgroups.remove_runner_dirs()


PID_NAMESPACE_CHILD = r"""
import ctypes, os, sys, time
from secure_runner.runner.sandbox import namespaces
namespaces.apply()
print(f"{os.getpid()} {os.getppid()} {os.readlink('/proc/self')}", flush=True)  # the host's /proc: host pid
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
if sys.argv[1] == "exit":
    os._exit(7)
if sys.argv[1] == "fault":
    ctypes.string_at(0)
time.sleep(600)
"""


@pytest.mark.parametrize("ending", ["exit", "fault", "waiter killed"])
def test_the_pid_namespace_waiter_ends_as_its_worker_does(ending):
    """The runner sees one pid: it must end with the worker's exit code or signal, its CPU time
    included, and a worker must not outlive it."""
    require(os.geteuid() == 0, ROOT_ONLY)
    child = subprocess.Popen([sys.executable, "-c", PID_NAMESPACE_CHILD, ending], stdout=subprocess.PIPE, text=True)
    pid, parent, host_pid = child.stdout.readline().split()
    assert (pid, parent) == ("1", "0")  # pid 1 of its namespace; the waiter is outside it
    if ending == "waiter killed":
        time.sleep(0.5)
        child.kill()
    _pid, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    expected = {"exit": 7, "fault": -signal.SIGSEGV, "waiter killed": -signal.SIGKILL}[ending]
    assert child.returncode == expected
    if ending != "waiter killed":  # reaped by the waiter: its CPU time is in what wait4 tells the runner
        assert usage.ru_utime + usage.ru_stime >= 0.25
    assert _dead(int(host_pid))


def test_policy_validates_layers_and_explains_refusals():
    with pytest.raises(ValueError, match="unknown sandbox layer"):
        SandboxPolicy(allow_missing=("firewall",))
    layers = [LayerResult(name, name != "landlock", "ok" if name != "landlock" else "kernel has no Landlock") for name in LAYERS]
    assert SandboxPolicy().refusal(layers) == "required sandbox layer missing: landlock (kernel has no Landlock)"
    assert SandboxPolicy(allow_missing=("landlock",)).refusal(layers) == ""
    assert "seccomp (not reported)" in SandboxPolicy().refusal(layers[:-1])


def test_restart_backoff_grows_and_is_capped():
    delays = [backoff_seconds(n) for n in range(1, 12)]
    assert delays[0] == 0.0  # the first failure restarts at once
    assert delays[1:4] == [0.5, 1.0, 2.0]
    assert max(delays) == BACKOFF_MAX_SECONDS and delays == sorted(delays)


def test_minimal_read_only_paths_drop_nested_and_system_dirs(tmp_path):
    from secure_runner.runner.sandbox import filesystem

    (tmp_path / "a" / "b").mkdir(parents=True)
    kept = filesystem.minimal([str(tmp_path / "a" / "b"), str(tmp_path / "a"), "/usr/lib", str(tmp_path / "a") + "/"])
    assert kept == [str(Path(tmp_path / "a").resolve())]


def test_require_skips_with_a_reason_but_fails_under_ci(monkeypatch, capsys):
    require(True, "never shown")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no landlock here"):
        require(False, "no landlock here")
    assert "SKIPPED: no landlock here" in capsys.readouterr().out
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required in CI: no landlock here"):
        require(False, "no landlock here")
