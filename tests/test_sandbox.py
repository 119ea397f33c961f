"""The worker sandbox, from the outside: malicious submissions run by real runners.

Each probe is a call a coordinator could make to the attacker submission in
tests/models/probes/attacker. A test asserts the attempt was stopped (the
probe reports the error it got, or the call fails with the precise cause) and
that the same runner still serves a good call afterwards.

These tests need root and the kernel features of DESIGN.md section 4. Where
they are missing the tests skip with the reason, except under CI=true, where
such a skip is a failure (see `require`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import site
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secure_runner import codec
from secure_runner.errors import ErrorCode
from secure_runner.runner.sandbox import cgroups
from secure_runner.v1 import runner_pb2

from conftest import BASE_PATH, MODELS, RawCoordinator, RunnerProcess, write_submission

OK = runner_pb2.CALL_STATUS_SUCCESS
FAILURE = runner_pb2.CALL_STATUS_FAILURE
TIMEOUT = runner_pb2.CALL_STATUS_TIMEOUT
PROBES = MODELS / "probes"
MODEL = "counter"  # a model id of the test PKI; the submission behind it is ours
TIGHT = ("--memory-mib", "256", "--cpu-seconds", "2", "--pids", "32", "--address-space-mib", "16384")


def require(condition: bool, reason: str) -> None:
    """Skip with a printed reason where this machine lacks what a test needs; under CI=true, fail instead."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"required in CI: {reason}")
    print(f"SKIPPED: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def sandbox_available() -> None:
    require(os.geteuid() == 0, "the sandbox layers need a runner started as root")
    check = subprocess.run(
        [sys.executable, "-m", "secure_runner.cli", "sandbox-check"], capture_output=True, text=True, timeout=60
    )
    require(check.returncode == 0, f"a sandbox layer is missing on this machine:\n{check.stdout}{check.stderr}")


@pytest.fixture(scope="module")
def attacker(tmp_path_factory, sandbox_available) -> Path:
    """A copy of the attacker submission plus a setuid-root copy of `id` inside it."""
    folder = tmp_path_factory.mktemp("attacker") / "attacker"
    shutil.copytree(PROBES / "attacker", folder)
    setuid_id = folder / "id-setuid"
    shutil.copy2(shutil.which("id"), setuid_id)
    os.chown(setuid_id, 0, 0)
    setuid_id.chmod(0o4755)
    return folder


@pytest.fixture(scope="module")
def default_runner(layout, attacker, sandbox_available):
    runner = RunnerProcess(layout, MODEL, attacker)
    yield runner
    runner.stop()


@pytest.fixture(scope="module")
def tight_runner(layout, attacker, sandbox_available):
    runner = RunnerProcess(layout, MODEL, attacker, *TIGHT)
    yield runner
    runner.stop()


async def _client(layout, runner) -> RawCoordinator:
    client = RawCoordinator(layout, runner.address, MODEL)
    assert (await client.setup()).status == OK
    return client


async def _probe(client: RawCoordinator, name: str, *args, timeout: float = 30.0) -> runner_pb2.CallResponse:
    return await client.call("echo", {"probe": name, "args": list(args)}, timeout=timeout)


async def _report(client: RawCoordinator, name: str, *args) -> dict:
    response = await _probe(client, name, *args)
    assert response.status == OK, response
    return codec.from_variant(response.output)


async def _still_serves(client: RawCoordinator) -> None:
    response = await client.call("echo", "still here", timeout=60)
    assert response.status == OK, response
    assert codec.from_variant(response.output) == "still here"


def _stopped(report: dict, *errors: str) -> None:
    assert "error" in report, f"the attempt was not stopped: {report}"
    assert report["error"].startswith(errors), report


async def test_tcp_connect_to_a_host_loopback_server_is_refused(layout, default_runner):
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    client = await _client(layout, default_runner)
    report = await _report(client, "tcp_connect", server.getsockname()[1])
    _stopped(report, "PermissionError")  # seccomp: AF_INET sockets are refused
    with pytest.raises(BlockingIOError):
        server.accept()  # and nothing ever reached the host's listener
    server.close()
    await _still_serves(client)
    await client.close()


async def test_dns_lookup_fails(layout, default_runner):
    client = await _client(layout, default_runner)
    _stopped(await _report(client, "dns", "example.com"), "gaierror")
    await _still_serves(client)
    await client.close()


async def test_abstract_unix_socket_of_the_host_is_unreachable(layout, default_runner):
    name = f"secure-runner-test-{uuid.uuid4().hex}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + name)
    server.listen()
    server.setblocking(False)
    client = await _client(layout, default_runner)
    # Another network namespace (refused) and a Landlock scope (EPERM) each stop it.
    _stopped(await _report(client, "abstract_unix", name), "ConnectionRefusedError", "PermissionError")
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()
    await _still_serves(client)
    await client.close()


async def test_pathname_unix_sockets_in_a_bound_tree_are_unreachable(layout, default_runner):
    """A world-writable host socket inside the read-only base-class tree: no connect, no datagram."""
    stream_path, datagram_path = (BASE_PATH / f"host-{kind}-{uuid.uuid4().hex[:8]}.sock" for kind in ("s", "d"))
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        stream.bind(str(stream_path))
        stream.listen()
        datagram.bind(str(datagram_path))
        for sock, path in ((stream, stream_path), (datagram, datagram_path)):
            sock.setblocking(False)
            path.chmod(0o777)
        client = await _client(layout, default_runner)
        _stopped(await _report(client, "unix_path", str(stream_path)), "PermissionError")
        for kind in ("SOCK_DGRAM", "SOCK_RAW"):
            _stopped(await _report(client, "unix_path_datagram", str(datagram_path), kind), "PermissionError")
        with pytest.raises(BlockingIOError):
            stream.accept()  # nothing reached the host's listener
        with pytest.raises(BlockingIOError):
            datagram.recv(100)
        await _still_serves(client)
        await client.close()
    finally:
        for sock, path in ((stream, stream_path), (datagram, datagram_path)):
            sock.close()
            path.unlink(missing_ok=True)


async def test_inotify_on_the_shared_trees_is_refused(layout, default_runner):
    client = await _client(layout, default_runner)
    _stopped(await _report(client, "inotify"), "PermissionError")  # EPERM from seccomp
    await _still_serves(client)
    await client.close()


async def test_the_worker_sees_no_process_outside_its_pid_namespace(layout, default_runner):
    client = await _client(layout, default_runner)
    seen = (await _report(client, "pid_view", default_runner.proc.pid))["done"]
    assert seen["ppid"] == 0, seen  # its parent lives outside its PID namespace
    assert seen["signal_runner"] == "ProcessLookupError", seen
    assert seen["pidfd_runner"] in ("ProcessLookupError", "PermissionError"), seen
    assert seen["visible_pids"] == 1, seen  # only itself
    await _still_serves(client)
    await client.close()


async def test_proc_shows_neither_host_mounts_nor_host_load(layout, default_runner):
    mount_files = ("/proc/self/mountinfo", "/proc/self/mounts", "/proc/mounts", "/proc/thread-self/mountinfo",
                   "/proc/self/mountstats")
    load_files = ("/proc/stat", "/proc/loadavg", "/proc/uptime", "/proc/meminfo")
    client = await _client(layout, default_runner)
    seen = (await _report(client, "proc_files", *mount_files, *load_files))["done"]
    assert all(seen[path] == "PermissionError" for path in mount_files), seen
    assert seen["/proc/loadavg"].startswith("0.00 0.00 0.00 "), seen
    assert seen["/proc/uptime"] == "0.00 0.00\n", seen
    cpu_lines = [line for line in seen["/proc/stat"].splitlines() if line.startswith("cpu")]
    assert len(cpu_lines) == os.cpu_count() + 1, seen  # CPU counting still works
    assert all(set(line.split()[1:]) == {"0"} for line in cpu_lines), seen  # no host counters
    assert "btime 0" in seen["/proc/stat"], seen
    meminfo = {line.split(":")[0]: line.split()[1] for line in seen["/proc/meminfo"].splitlines()}
    assert meminfo["MemTotal"] == meminfo["MemAvailable"] == str(2 << 20), seen  # its own 2 GiB limit, in kB
    await _still_serves(client)
    await client.close()


async def test_global_site_packages_of_the_base_interpreter_are_not_visible(layout, default_runner):
    in_use = {Path(p).resolve() for p in sys.path if p}
    candidates = [Path(p) for p in site.getsitepackages([sys.base_prefix]) if Path(p).is_dir()]
    candidates = [p for p in candidates if p.resolve() not in in_use]
    require(bool(candidates), "the base interpreter has no global site-packages outside this environment")
    global_dir = candidates[0]
    planted = global_dir / f"planted-{uuid.uuid4().hex[:8]}.pem"
    planted.write_text("-----BEGIN PRIVATE KEY-----\n")
    planted.chmod(0o644)
    try:
        client = await _client(layout, default_runner)
        _stopped(await _report(client, "read", str(planted)), "FileNotFoundError")
        assert planted.name not in (await _report(client, "listdir", str(global_dir))).get("done", []), global_dir
        await _still_serves(client)
        await client.close()
    finally:
        planted.unlink()


@pytest.mark.parametrize(
    "target",
    ["/etc/shadow", "runner TLS key", "another submission", "runner environ", "/root/.bash_history", "/proc/1/environ"],
)
async def test_reading_outside_the_allowlist_fails(layout, default_runner, target):
    client = await _client(layout, default_runner)
    path = {
        "runner TLS key": str(layout.runner_key(MODEL)),
        "another submission": str(MODELS / "submissions" / "async-model" / "main.py"),
        "runner environ": f"/proc/{default_runner.proc.pid}/environ",
    }.get(target, target)
    assert Path(path).exists() or target.startswith("/root"), path  # the host has it; the worker must not
    report = await _report(client, "read", path)
    _stopped(report, "FileNotFoundError", "PermissionError")
    await _still_serves(client)
    await client.close()


async def test_writes_outside_the_private_tmp_fail(layout, default_runner, attacker, tmp_path):
    client = await _client(layout, default_runner)
    targets = [attacker / "pwned.py", tmp_path / "pwned", Path("/var/tmp/pwned"), Path("/pwned")]
    for target in targets:
        _stopped(await _report(client, "write", str(target)), "OSError", "PermissionError", "FileNotFoundError")
        assert not target.exists()
    assert not (attacker / "pwned.py").exists()
    # Its own /tmp works (and is private: nothing appears in the host's /tmp).
    assert await _report(client, "temp_file") == {"done": "scratch"}
    assert not Path("/tmp/scratch.txt").exists()
    await _still_serves(client)
    await client.close()


async def test_setuid_binary_gives_no_privilege(layout, default_runner, attacker):
    assert (attacker / "id-setuid").stat().st_mode & stat.S_ISUID
    client = await _client(layout, default_runner)
    report = await _report(client, "exec_setuid", str(attacker / "id-setuid"))
    euid = int(report["done"])  # it ran, but as the worker's own uid: nosuid mount + no_new_privs
    assert euid != 0 and euid >= 1_000_000_000
    await _still_serves(client)
    await client.close()


async def test_signalling_or_tracing_the_runner_fails(layout, default_runner):
    client = await _client(layout, default_runner)
    runner_pid = default_runner.proc.pid
    # The runner's pid names no process in the worker's PID namespace; ptrace is refused by seccomp.
    _stopped(await _report(client, "signal_runner", runner_pid), "ProcessLookupError")
    _stopped(await _report(client, "ptrace_runner", runner_pid), "PermissionError")
    assert default_runner.proc.poll() is None  # the runner lives on
    await _still_serves(client)
    await client.close()


async def test_creating_a_user_namespace_fails(layout, default_runner):
    client = await _client(layout, default_runner)
    _stopped(await _report(client, "user_namespace"), "PermissionError")
    await _still_serves(client)
    await client.close()


async def test_ten_gib_allocation_is_refused_by_the_address_space_limit(layout, default_runner):
    client = await _client(layout, default_runner)
    response = await client.call("echo", {"probe": "allocate", "args": [10], "raise": True}, timeout=30)
    assert response.status == FAILURE
    assert response.error.code == ErrorCode.MEMORY_LIMIT
    assert "MemoryError" in response.error.message
    await _still_serves(client)
    await client.close()


async def test_ten_gib_allocation_is_killed_by_the_cgroup_memory_limit(layout, tight_runner):
    """With the address space raised, writing 10 GiB meets the 256 MiB cgroup limit and its OOM killer."""
    client = await _client(layout, tight_runner)
    response = await _probe(client, "allocate", 10)
    assert response.status == FAILURE
    assert response.error.code == ErrorCode.MEMORY_LIMIT, response
    assert "memory limit (256 MiB)" in response.error.message
    await _still_serves(client)
    await client.close()


async def test_cpu_spin_ignoring_sigxcpu_is_killed_at_the_cpu_limit(layout, tight_runner):
    client = await _client(layout, tight_runner)
    response = await _probe(client, "spin_ignoring_sigxcpu", timeout=60)
    assert response.status == FAILURE
    assert response.error.code == ErrorCode.CPU_LIMIT, response
    assert "2 CPU seconds" in response.error.message and "SIGKILL" in response.error.message
    await _still_serves(client)
    await client.close()


async def test_fork_bomb_hits_the_pids_limit(layout, tight_runner):
    client = await _client(layout, tight_runner)
    report = await _report(client, "fork_bomb", 2)
    done = report["done"]
    assert done["failures"] > 0, done  # fork was refused once the cgroup (32 tasks) was full
    assert done["last"].startswith("BlockingIOError"), done
    await _still_serves(client)
    await client.close()


def _worker_pids(runner: RunnerProcess) -> list[int]:
    """Host pids in the runner's worker cgroups (the waiter and the worker inside its PID namespace)."""
    pids = []
    for hierarchy in cgroups.hierarchies():
        for procs in hierarchy.own.glob(f"{cgroups.RUNNER_DIR_PREFIX}{runner.proc.pid}/*/cgroup.procs"):
            pids += [int(pid) for pid in procs.read_text().split()]
    return sorted(set(pids))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


async def test_a_busy_worker_dies_with_its_runner(layout, fresh_runner, attacker):
    """SIGKILL the runner while its model spins: the worker must not live on (its parent-death
    signal survives the uid drop, and the waiter outside its PID namespace passes it on)."""
    runner = fresh_runner(MODEL, attacker)
    client = await _client(layout, runner)
    spinning = asyncio.create_task(_probe(client, "spin_ignoring_sigxcpu", timeout=60))
    pids: list[int] = []
    try:
        for _ in range(200):
            pids = _worker_pids(runner)
            if any(_state(pid) == "R" for pid in pids):
                break
            await asyncio.sleep(0.025)
        assert any(_state(pid) == "R" for pid in pids), pids
        runner.proc.kill()
        runner.proc.wait()
        for _ in range(40):  # at once (parent-death signals), not at some later cleanup
            if all(_state(pid) in ("gone", "Z") for pid in pids):
                break
            await asyncio.sleep(0.05)
        assert {pid: _state(pid) for pid in pids if _state(pid) not in ("gone", "Z")} == {}
    finally:
        spinning.cancel()
        await client.close()
        for pid in pids:  # never leave a spinning process behind, whatever happened above
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_sleeping_forever_times_out_and_the_worker_is_replaced(layout, default_runner):
    client = await _client(layout, default_runner)
    response = await client.call("hang", 10**6, timeout=2)
    assert response.status == TIMEOUT
    assert response.error.code == ErrorCode.MODEL_TIMEOUT
    await _still_serves(client)
    await client.close()


async def test_benign_numpy_model_returns_correct_results(layout, fresh_runner, sandbox_available):
    runner = fresh_runner(MODEL, PROBES / "numpy-model")
    client = await _client(layout, runner)
    matrix = [[4.0, 1.0, 0.5], [1.0, 3.0, 0.25], [0.5, 0.25, 2.0]]
    vector = [1.0, -2.0, 0.5]
    response = await client.call("echo", {"matrix": matrix, "vector": vector})
    assert response.status == OK, response
    result = codec.from_variant(response.output)
    m, v = np.array(matrix), np.array(vector)
    expected = np.concatenate([np.linalg.solve(m, v), [v @ v], np.linalg.eigvalsh(m @ m.T)])
    np.testing.assert_allclose(result, expected, rtol=1e-12)
    assert await client.count() == 1
    await client.close()


async def _health(client: RawCoordinator) -> int:
    stub = health_pb2_grpc.HealthStub(client.channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=MODEL))).status


async def test_a_crash_looping_model_backs_off_and_recovers(layout, fresh_runner, tmp_path, sandbox_available):
    submission = write_submission(
        tmp_path,
        "crash-loop",
        {"echo": "def echo(self, value):\n        if value == 'die':\n            os._exit(3)\n        return value"},
        imports="import os",
    )
    runner = fresh_runner(MODEL, submission)
    client = await _client(layout, runner)
    first = await client.call("echo", "die")
    assert (first.error.code, "exit code 3" in first.error.message) == (ErrorCode.WORKER_CRASHED, True)
    second = await client.call("echo", "die", timeout=30)  # a fresh worker, which crashes again
    assert second.error.code == ErrorCode.WORKER_CRASHED
    # Two failures in a row: no new worker for a while, the cause is kept, health says so.
    during = await client.call("echo", "alive")
    # Already reported (and counted) once: now the runner says the worker is being replaced.
    assert during.status == FAILURE and during.error.code == ErrorCode.MODEL_RESTARTING
    assert "after WORKER_CRASHED" in during.error.message and "worker restarts in" in during.error.message
    assert await _health(client) == health_pb2.HealthCheckResponse.NOT_SERVING
    for _ in range(100):  # the background restart brings it back without any call
        if await _health(client) == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.1)
    assert await _health(client) == health_pb2.HealthCheckResponse.SERVING
    await _still_serves(client)
    await client.close()


def test_sandbox_check_reports_every_layer_active(sandbox_available):
    result = subprocess.run(
        [sys.executable, "-m", "secure_runner.cli", "sandbox-check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("  [")]
    assert [line.split()[2] for line in lines] == [
        "environment", "cgroup", "rlimits", "namespaces", "filesystem", "uid", "no_new_privs", "landlock", "seccomp",
    ]
    assert all("[active ]" in line and "[verified:" in line for line in lines), result.stdout
    details = {line.split()[2]: line for line in lines}
    assert "pid 1, no parent visible" in details["namespaces"], result.stdout
    assert "host-wide files masked" in details["filesystem"] and "no global site-packages" in details["filesystem"]
    assert "reading /proc/self/mountinfo are refused" in details["landlock"], result.stdout
    assert "AF_UNIX sockets are refused, a stream socket pair works" in details["seccomp"], result.stdout


def test_runner_refuses_to_start_without_a_required_layer(layout, fresh_runner, tmp_path, capfd, sandbox_available):
    """A submission the worker's uid cannot read makes the uid layer impossible: no start without an opt-out."""
    submission = write_submission(tmp_path, "private", {})
    submission.chmod(0o700)
    with pytest.raises(RuntimeError, match="runner did not start"):
        fresh_runner(MODEL, submission)
    err = capfd.readouterr().err
    assert "SANDBOX_UNAVAILABLE" in err and "uid" in err and "not readable by other users" in err
    # The explicit opt-out starts it, and says so in the log.
    runner = fresh_runner(MODEL, submission, "--allow-missing-layer", "uid")
    err = capfd.readouterr().err
    assert "sandbox layer uid may be missing: explicitly allowed" in err
    assert "sandbox layer uid is MISSING (allowed by --allow-missing-layer)" in err
    assert runner.proc.poll() is None


async def test_a_worker_dying_between_calls_shows_in_health_at_once(layout, fresh_runner, tmp_path, sandbox_available):
    submission = write_submission(
        tmp_path,
        "late-death",
        {"echo": "def echo(self, value):\n"
                 "        threading.Timer(0.3, os._exit, (5,)).start()\n"
                 "        return value"},
        imports="import os\nimport threading",
    )
    runner = fresh_runner(MODEL, submission)
    client = await _client(layout, runner)
    assert (await client.call("echo", 1)).status == OK  # answers, then dies 0.3 s later
    seen = []
    for _ in range(100):
        seen.append(await _health(client))
        if health_pb2.HealthCheckResponse.NOT_SERVING in seen and seen[-1] == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.02)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen and seen[-1] == health_pb2.HealthCheckResponse.SERVING
    response = await client.call("echo", "again")  # a fresh worker, set up again (it dies again later)
    assert response.status == OK and codec.from_variant(response.output) == "again"
    await client.close()
