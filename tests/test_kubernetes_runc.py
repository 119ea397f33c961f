"""The runner Pod's settings on a real container runtime: runc, fanned out to from the host.

The kubelet hands a Pod's container to containerd, which runs it with runc. Here runc
runs the runner with the settings `runner_pod` asks for, taken from the manifest itself:
its uid and gid, no capabilities at all, no_new_privs (allowPrivilegeEscalation: false),
a read-only root, the project's seccomp profile (deploy/seccomp/secure-runner.json, the
`Localhost` option), memory and CPU limits, its own PID, IPC, UTS and mount namespaces,
the Secret's TLS files (0440, group fsGroup), the registry and the submissions read-only,
emptyDirs for /tmp and the state folder; its own network namespace reached from the host
over a veth pair (as a CNI plugin would). The image is stood in for by read-only binds
of this host's Python and checkout (what deploy/Containerfile installs); the Pod's
args start the runner with `--profile pod` (no `--allow-missing-layer`), and its log
names the four layers the Pod provides instead.

A real coordinator client then fans out to it from the host with mTLS and signed
tokens through an orchestrator's model list: calls succeed; a model trying to connect
to the host's side of the veth fails (the worker's seccomp and Landlock layers, which
apply unprivileged; on a cluster the NetworkPolicy also denies all egress); the runner
serves its gRPC health over mTLS.
A second process in the container (`runc exec`) finds the Pod's limits from the inside:
its uid, no capabilities, no_new_privs, a read-only root, and the profile's denials.
Needs root, runc and iproute2 on x86_64: skipped elsewhere with the reason, failed under
CI=true. gVisor's runsc is not tested here: the README says what failed under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secure_runner.client.results import CallStatus
from secure_runner.orchestrator import kubernetes as k8s
from secure_runner.orchestrator.launcher import RunnerSpec
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.transport import tls

from conftest import BASE_PATH, CRUNCH, TESTS, by_id, connected, credentials, fresh_pki, json_args, write_submission
from test_sandbox import require  # skip with the reason here, fail under CI=true

REPO = TESTS.parent
PROFILE = REPO / "deploy" / "seccomp" / "secure-runner.json"
MODEL = "alpha"
HOST_IP, POD_IP = "10.231.0.1", "10.231.0.2"
# What a runner in a Pod cannot apply to its workers, unprivileged: the Pod provides them (sandbox/policy.py).
POD_PROVIDED = ["cgroup", "namespaces", "filesystem", "uid"]
PROBE = """def echo(self, value):
        if isinstance(value, dict) and "connect" in value:
            import socket
            try:
                socket.create_connection(tuple(value["connect"]), timeout=2).close()
                return "connected"
            except OSError as exc:
                return f"{type(exc).__name__}: {exc}"
        return value"""


EPERM = 1
# x86_64 system call numbers; each is denied by deploy/seccomp/secure-runner.json (or by missing capabilities).
CONTAINER_PROBE = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
def errno(result):
    return ctypes.get_errno() if result == -1 else 0
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "uid": os.getuid(),
    "capabilities": [status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
    "no_new_privs": status["NoNewPrivs"].strip(),
    "root_read_only": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
    "unshare(CLONE_NEWUSER)": errno(libc.unshare(0x10000000)),
    "mount": errno(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
    "ptrace": errno(libc.syscall(101, 0, 0, 0, 0)),
    "io_uring_setup": errno(libc.syscall(425, 1, None)),
    "bpf": errno(libc.syscall(321, 0, None, 0)),
}))
"""


def oci_config(pod: dict, rootfs: Path, binds: dict[str, Path], netns: Path) -> dict:
    """An OCI runtime config with exactly the container settings of `pod` (asserted field by field)."""
    spec = pod["spec"]
    (container,) = spec["containers"]
    context, pod_context = container["securityContext"], spec["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]} and context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True and pod_context["runAsNonRoot"] is True
    assert pod_context["seccompProfile"] == {"type": "Localhost", "localhostProfile": "secure-runner.json"}
    limits = container["resources"]["limits"]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    for mount in container["volumeMounts"]:  # the Pod's volumes, where it mounts them
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        if "emptyDir" in volume:  # the kubelet's emptyDir: a fresh host folder, mode 0777, bound in
            empty_dir = rootfs.parent / "empty-dirs" / volume["name"]
            empty_dir.mkdir(parents=True)
            empty_dir.chmod(0o777)
            mounts.append({"destination": mount["mountPath"], "type": "bind", "source": str(empty_dir),
                           "options": ["rbind", "rw", "nosuid", "nodev"]})
        else:
            assert mount["readOnly"] is True
            mounts.append({"destination": mount["mountPath"], "type": "bind", "source": str(binds[mount["name"]]),
                           "options": ["rbind", "ro", "nosuid", "nodev"]})
    # The image, stood in for by the host's own files, bound last: a checkout under /tmp (as CI's
    # may be) must not be hidden by the Pod's /tmp volume.
    for path in ("/usr", "/etc/ld.so.cache", str(Path(sys.base_prefix)), str(REPO)):
        mounts.append({"destination": path, "type": "bind", "source": path, "options": ["rbind", "ro", "nosuid"]})
    return {
        "ociVersion": "1.0.2",
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": pod["metadata"]["name"][:63],
        "process": {
            "user": {"uid": pod_context["runAsUser"], "gid": pod_context["runAsGroup"],
                     "additionalGids": [pod_context["fsGroup"]]},
            "args": [str(REPO / ".venv" / "bin" / "secure-runner"), *container["args"]],  # the image's ENTRYPOINT
            "env": ["PATH=/usr/bin:/bin", "HOME=/tmp", "PYTHONDONTWRITEBYTECODE=1"],
            "cwd": "/tmp",
            "capabilities": {kind: [] for kind in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "noNewPrivileges": not context["allowPrivilegeEscalation"],
        },
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                           {"type": "network", "path": str(netns)}],
            "seccomp": json.loads(PROFILE.read_text()),
            "resources": {"memory": {"limit": 1 << 30}, "cpu": {"quota": 100_000 * int(limits["cpu"]), "period": 100_000}},
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


@contextlib.contextmanager
def network_namespace(name: str):
    """A network namespace reached from the host over a veth pair: the Pod's network, as a CNI plugin makes it."""
    host_side, pod_side = f"vh{name[:10]}", f"vp{name[:10]}"
    run = lambda *args: subprocess.run(["ip", *args], check=True, capture_output=True)  # noqa: E731
    run("netns", "add", name)
    try:
        run("link", "add", host_side, "type", "veth", "peer", "name", pod_side)
        run("link", "set", pod_side, "netns", name)
        run("addr", "add", f"{HOST_IP}/30", "dev", host_side)
        run("link", "set", host_side, "up")
        run("-n", name, "addr", "add", f"{POD_IP}/30", "dev", pod_side)
        run("-n", name, "link", "set", pod_side, "up")
        run("-n", name, "link", "set", "lo", "up")
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "link", "del", host_side], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def secret_volume(layout, folder: Path, uid: int, mode: int) -> Path:
    """The Secret as the kubelet mounts it: root-owned files of group fsGroup, `defaultMode`."""
    folder.mkdir()
    for name, source in (("tls.crt", layout.runner_cert(MODEL)), ("tls.key", layout.runner_key(MODEL)),
                         ("ca.crt", layout.ca_cert)):
        shutil.copy(source, folder / name)
        os.chown(folder / name, 0, uid)
        (folder / name).chmod(mode)
    return folder


@pytest.fixture
def runc_available() -> None:
    require(os.geteuid() == 0, "runc runs containers as root here")
    require(shutil.which("runc") is not None, "runc is not installed (Debian: apt-get install runc)")
    require(shutil.which("ip") is not None, "iproute2 is not installed")
    require(platform.machine() == "x86_64", "the container probe uses x86_64 system call numbers")


async def test_runner_in_a_runc_container_with_the_pods_settings(tmp_path, runc_available):
    layout = fresh_pki(tmp_path, MODEL)
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    write_submission(submissions, MODEL, {"echo": PROBE})
    for path in (tmp_path, submissions, submissions / MODEL):
        path.chmod(0o755)
    settings = k8s.KubernetesSettings(
        namespace="ns", image="stand-in", submissions_claim="subs", cpu="1", memory="1Gi",
        seccomp_profile="Localhost:secure-runner.json", base_paths=[str(BASE_PATH)],
    )
    spec = RunnerSpec(MODEL, f"{MODEL}-0000", {MODEL: submissions / MODEL})
    pod = k8s.runner_pod(settings, CRUNCH, spec)
    uid = pod["spec"]["securityContext"]["runAsUser"]
    registry = tmp_path / "registry"
    registry.mkdir(mode=0o755)
    shutil.copy(layout.registry, registry / "registry.json")
    (registry / "registry.json").chmod(0o444)
    binds = {"tls": secret_volume(layout, tmp_path / "tls", uid, pod["spec"]["volumes"][0]["secret"]["defaultMode"]),
             "registry": registry, "submissions": submissions}
    rootfs = tmp_path / "rootfs"
    for folder in ("proc", "dev", "sys", "tmp", "usr", "etc"):
        (rootfs / folder).mkdir(parents=True)
    for link in ("bin", "sbin", "lib", "lib64"):  # Debian's merged /usr
        (rootfs / link).symlink_to(f"usr/{link}")
    container_id = f"sr-{uuid.uuid4().hex[:10]}"
    with network_namespace(container_id) as netns:
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(oci_config(pod, rootfs, binds, netns)))
        log = open(tmp_path / "runner.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(["runc", "run", "--bundle", str(bundle), container_id],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            assert line == f"READY {settings.port}\n".encode(), (line, (tmp_path / "runner.log").read_text()[-3000:])
            await _fan_out(layout, tmp_path, f"{POD_IP}:{settings.port}")
            # another process in the Pod's container (runc exec: the same user, capabilities, seccomp)
            probe = subprocess.run(["runc", "exec", container_id, str(REPO / ".venv" / "bin" / "python"), "-c",
                                    CONTAINER_PROBE], capture_output=True, text=True, timeout=60)
            assert probe.returncode == 0, probe.stderr
            runner_log = (tmp_path / "runner.log").read_text()
            for layer in POD_PROVIDED:
                assert f"sandbox layer {layer} is provided by the Pod (profile pod)" in runner_log, runner_log[-3000:]
            assert "MISSING" not in runner_log, runner_log[-3000:]
            assert json.loads(probe.stdout) == {
                "uid": uid, "capabilities": ["0000000000000000"] * 5, "no_new_privs": "1", "root_read_only": True,
                "unshare(CLONE_NEWUSER)": EPERM, "mount": EPERM, "ptrace": EPERM, "io_uring_setup": EPERM, "bpf": EPERM,
            }
        finally:
            subprocess.run(["runc", "kill", container_id, "KILL"], capture_output=True)
            proc.wait(30)
            subprocess.run(["runc", "delete", "--force", container_id], capture_output=True)
            log.close()


async def _fan_out(layout, tmp_path: Path, address: str) -> None:
    listing = tmp_path / "models.json"
    listing.write_text(json.dumps([{"model_id": MODEL, "deployment_id": f"{MODEL}-1", "address": address}]))
    orchestrator = subprocess.Popen(
        [sys.executable, str(TESTS / "static_orchestrator.py"), str(layout.root), CRUNCH, str(listing), "0",
         str(tmp_path / "orchestrator.jsonl")], stdout=subprocess.PIPE, text=True)
    listener = socket.create_server((HOST_IP, 0))
    try:
        line = orchestrator.stdout.readline()
        assert line.startswith("READY "), line
        async with connected(layout, int(line.split()[1])) as client:
            results = by_id(await client.call("echo", json_args(41)))
            assert results[MODEL].status == CallStatus.SUCCESS and results[MODEL].output == 41, results
            # the model reaches out to the host's side of the veth: refused inside the Pod
            probe = by_id(await client.call("echo", json_args({"connect": [HOST_IP, listener.getsockname()[1]]})))
            assert probe[MODEL].status == CallStatus.SUCCESS, probe
            assert probe[MODEL].output != "connected" and probe[MODEL].output.startswith("PermissionError"), probe
        server_name = PeerIdentity.make(CRUNCH, Role.RUNNER, MODEL).tls_server_name
        async with grpc.aio.secure_channel(address, credentials(layout), options=tls.channel_options(server_name)) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        listener.close()
        orchestrator.kill()
        orchestrator.wait()
