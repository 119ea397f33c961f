"""The runner trusts nothing a worker says: allowlists, answer sizes, deadlines, broken submissions.

Every test runs real malicious or broken submissions (`tests/models/malicious/`)
in real sandboxed workers behind a real runner, and checks from the outside,
with signed calls over mutual TLS, that the attack had no effect: the model's
own call counter shows it never ran what it should not, node-mates keep
serving, and no model is blamed for what the host did to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from secure_runner import codec, pki
from secure_runner.client.results import CallStatus, Fault, fault_of
from secure_runner.errors import ErrorCode, RequestError
from secure_runner.runner.server import RunnerServer, RunnerSettings
from secure_runner.runner.supervisor import ModelState
from secure_runner.smp.token import model_id_field
from secure_runner.transport import tls
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import runner_pb2

from test_sandbox import require
from conftest import (
    BASE_PATH, CRUNCH, MODELS, RawCoordinator, RunnerProcess, assert_refused, by_id, connected, eventually,
    fresh_pki, json_args, orchestrating, write_submission,
)

MALICIOUS = MODELS / "malicious"
COUNTER = MODELS / "submissions" / "counter"
FANOUT_RPC = "/secure_runner.v1.ModelRunner/FanOut"
OK = runner_pb2.CALL_STATUS_SUCCESS
FAILURE = runner_pb2.CALL_STATUS_FAILURE
DECLARED = ["count", "echo", "fail", "hang"]
FORBIDDEN = ["steal", "__class__", "__reduce__"]
STATUS_NAMES = {OK: CallStatus.SUCCESS, FAILURE: CallStatus.FAILURE, runner_pb2.CALL_STATUS_TIMEOUT: CallStatus.TIMEOUT}


def node_layout(layout: pki.PkiLayout, folder: Path, node_id: str) -> pki.PkiLayout:
    """A copy of the test PKI with a runner certificate for `node_id`."""
    private = pki.PkiLayout(shutil.copytree(layout.root, folder / "pki"))
    pki.issue_runner_certificate(private, node_id)
    return private


@contextlib.contextmanager
def node_runner(layout: pki.PkiLayout, folder: Path, node_id: str, models: dict[str, Path]):
    """A real `secure-runner runner` process hosting `models` as one node."""
    private = node_layout(layout, folder, node_id)
    (first, first_path), *others = models.items()
    extra = [arg for model_id, path in others for arg in ("--model", f"{model_id}={path}")]
    runner = RunnerProcess(private, first, first_path, *extra, "--node-id", node_id)
    try:
        yield private, runner
    finally:
        runner.stop()


class Node:
    """A coordinator speaking to one node: Setup and Call per model, FanOut for several."""

    def __init__(self, layout: pki.PkiLayout, address: str, node_id: str) -> None:
        self.node_id = node_id
        self.raw = RawCoordinator(layout, address, node_id)

    def as_model(self, model_id: str) -> RawCoordinator:
        self.raw.model_id = model_id
        return self.raw

    async def setup(self, *model_ids: str) -> list[runner_pb2.SetupResponse]:
        return [await self.as_model(model_id).setup() for model_id in model_ids]

    async def fan_out(self, method: str, per_model: dict[str, list], timeout: float = 30.0) -> dict:
        """One FanOut of `method`, each model with its own arguments; {model id: CallResponse}."""
        request = runner_pb2.FanOutRequest(model_ids=list(per_model), method=method)
        for model_id, values in per_model.items():
            request.per_model.add(model_id=model_id, arguments=codec.encode_arguments(values, {})[0])
        body = model_id_field(self.node_id) + request.SerializeToString()
        self.raw.model_id = self.node_id
        token = self.raw.token(body, rpc=FANOUT_RPC, method=method, audience=list(per_model))
        stream = self.raw.channel.unary_stream(FANOUT_RPC, response_deserializer=runner_pb2.FanOutResults.FromString)
        results = {}
        async for batch in stream(body, metadata=((TOKEN_KEY, token),), timeout=timeout):
            results.update((result.model_id, result.response) for result in batch.results)
        return results

    async def close(self) -> None:
        await self.raw.close()


# -- the allowlist comes from trusted code only ----------------------------------------------


async def test_a_submission_can_neither_widen_its_allowlist_nor_shadow_trusted_modules(layout, tmp_path):
    models = {"thief": MALICIOUS / "patch-allowlist", "shadow": MALICIOUS / "shadows"}
    with node_runner(layout, tmp_path, "trust-node", models) as (private, runner):
        node = Node(private, runner.address, "trust-node")
        for setup in await node.setup(*models):
            assert setup.status == OK, setup
            assert list(setup.methods) == DECLARED  # the base class's own, whatever the submission patched
        for model_id in models:
            for method in FORBIDDEN:
                await assert_refused(
                    node.as_model(model_id).call(method), grpc.StatusCode.PERMISSION_DENIED,
                    ErrorCode.METHOD_NOT_ALLOWED, audited_by=runner,
                )
        for method in FORBIDDEN:
            results = await node.fan_out(method, dict.fromkeys(models, []))
            assert {m: (r.status, r.error.code) for m, r in results.items()} == dict.fromkeys(
                models, (FAILURE, ErrorCode.METHOD_NOT_ALLOWED)
            )
        for model_id in models:  # neither model ever ran one of them
            assert await node.as_model(model_id).count() == 0
        # The shadowing modules were never loaded: each name came from its trusted place.
        origins = codec.from_variant((await node.as_model("shadow").call("echo", "origins")).output)
        assert Path(origins["sr_testgame.base"]).resolve().is_relative_to(BASE_PATH)
        assert Path(origins["secure_runner"]).resolve().is_relative_to(Path(codec.__file__).resolve().parent)
        assert Path(origins["csv"]).resolve().is_relative_to(Path(os.__file__).resolve().parent)
        await node.close()


async def test_the_coordinators_client_never_calls_a_method_a_submission_added(tmp_path):
    private = fresh_pki(tmp_path, "thief")
    async with orchestrating(private, tmp_path, {"thief": MALICIOUS / "patch-allowlist"}) as orchestrator:
        async with connected(private, orchestrator.port) as client:
            assert await client.ready(10)
            results = by_id(await client.call("echo", json_args("tick")))
            assert results["thief"].status is CallStatus.SUCCESS
            for method in FORBIDDEN:
                with pytest.raises(RequestError) as refused:
                    await client.call(method, [])
                assert refused.value.code == ErrorCode.METHOD_NOT_ALLOWED
            assert by_id(await client.call("count", []))["thief"].output == 1  # only the echo ran


# -- W-15: the worker's command line --------------------------------------------------------------


async def test_the_worker_command_line_shows_nothing_of_the_host(layout, fresh_runner, tmp_path):
    probe = "def echo(self, value):\n        return open('/proc/self/cmdline', 'rb').read().decode()"
    runner = fresh_runner("counter", write_submission(tmp_path, "cmdline", {"echo": probe}))
    client = RawCoordinator(layout, runner.address, "counter")
    assert (await client.setup()).status == OK
    seen = codec.from_variant((await client.call("echo", 0)).output)
    await client.close()
    assert seen.split("\0")[:-1] == [sys.executable, "-I", "-m", "secure_runner.runner.worker"]


# -- answers are bounded on the runner's side ------------------------------------------------


async def test_an_oversized_answer_fails_only_its_model_and_big_answers_share_the_stream(layout, tmp_path):
    bulky = write_submission(
        tmp_path, "bulky", {"echo": "def echo(self, value):\n        return b'x' * (15 << 20) if value == 'bulk' else value"}
    )
    greedy, big = ["greedy-1", "greedy-2"], ["bulky-1", "bulky-2", "bulky-3", "bulky-4", "bulky-5"]
    models = {"honest": COUNTER} | dict.fromkeys(greedy, MALICIOUS / "greedy") | dict.fromkeys(big, bulky)
    with node_runner(layout, tmp_path, "output-node", models) as (private, runner):
        node = Node(private, runner.address, "output-node")
        assert {s.status for s in await node.setup(*models)} == {OK}
        for _round in range(2):
            arguments = {"honest": ["hi"]} | {m: ["huge"] for m in greedy} | {m: ["bulk"] for m in big}
            results = await node.fan_out("echo", arguments)
            assert set(results) == set(models)  # one stream, every model's own answer
            for model_id in greedy:
                assert (results[model_id].status, results[model_id].error.code) == (
                    FAILURE, ErrorCode.MODEL_OUTPUT_TOO_LARGE
                )
            for model_id in big:  # 75 MiB in all: more than one message can carry
                assert results[model_id].status == OK and len(results[model_id].output.value) == 15 << 20
            assert codec.from_variant(results["honest"].output) == "hi"
        await node.close()
        assert runner.proc.poll() is None


# -- a starved model is not blamed for its timeout ---------------------------------------------


def _threads(pid: int) -> list[int]:
    return [int(task) for task in os.listdir(f"/proc/{pid}/task")]


def _descendants(pid: int) -> list[int]:
    found = []
    for task in _threads(pid):
        with contextlib.suppress(FileNotFoundError):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


CPU_CGROUP = Path("/sys/fs/cgroup/cpu")  # cgroup v1, as on this project's machines
HOG = """
import os, time
os.sched_setaffinity(0, {0})
end = time.monotonic() + 30  # even if the test dies first
while time.monotonic() < end:
    pass
"""


@contextlib.contextmanager
def hogging_cpu(victims: list[int], bystanders: list[int]):
    """Keep CPU 0 busy with a process whose cgroup outweighs any worker's 256 to 1; pin `victims` to CPU 0.

    `bystanders` (the test itself, the runner) are kept on CPU 1 meanwhile, so only the victims starve.
    """
    require(os.geteuid() == 0 and (CPU_CGROUP / "cpu.shares").exists(), "starving a worker needs root and cgroup v1 cpu")
    group = CPU_CGROUP / f"sr-test-hog-{os.getpid()}"
    group.mkdir()
    (group / "cpu.shares").write_text("262144")
    kept = {task: os.sched_getaffinity(task) for pid in bystanders for task in _threads(pid)}
    for task in kept:
        os.sched_setaffinity(task, {1})
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        (group / "cgroup.procs").write_text(str(hog.pid))
        for task in (task for pid in victims for task in _threads(pid)):
            os.sched_setaffinity(task, {0})
        yield
    finally:
        hog.kill()
        hog.wait()
        group.rmdir()
        for task, cpus in kept.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(task, cpus)


async def test_a_model_starved_of_cpu_by_the_host_is_not_blamed_for_its_timeout(layout, fresh_runner, tmp_path):
    work = "def echo(self, value):\n        return sum(i * i for i in range(value))"  # ~0.3 s of CPU for 3e6
    runner = fresh_runner("counter", write_submission(tmp_path, "worker-bee", {"echo": work}))
    client = RawCoordinator(layout, runner.address, "counter")
    assert (await client.setup()).status == OK
    assert (await client.call("echo", 3_000_000, timeout=20)).status == OK  # alone, it answers in time
    with hogging_cpu(_descendants(runner.proc.pid), [os.getpid(), runner.proc.pid]):
        starved = await client.call("echo", 3_000_000, timeout=1.5)
    assert (starved.status, starved.error.code) == (FAILURE, ErrorCode.WORKER_STARVED), starved
    assert fault_of(CallStatus.FAILURE, starved.error.code) is Fault.INFRASTRUCTURE
    assert (await client.call("echo", 3_000_000, timeout=20)).status == OK  # a fresh worker serves again
    await client.close()


async def test_a_noisy_neighbour_gets_no_node_mate_blamed(layout, tmp_path):
    quick = [f"quick-{i}" for i in range(20)]
    models = {"spinner": MALICIOUS / "spinner"} | dict.fromkeys(quick, COUNTER)
    with node_runner(layout, tmp_path, "busy-node", models) as (private, runner):
        node = Node(private, runner.address, "busy-node")
        assert {s.status for s in await node.setup(*models)} == {OK}
        for _round in range(3):
            results = await node.fan_out("echo", {"spinner": [30]} | {m: ["tick"] for m in quick}, timeout=1.5)
            assert set(results) == set(models)
            assert results["spinner"].status != OK
            for model_id in quick:
                result = results[model_id]
                assert fault_of(STATUS_NAMES[result.status], result.error.code) is not Fault.MODEL, (model_id, result)
                assert result.status != OK or codec.from_variant(result.output) == "tick"
        await node.close()


# -- fault isolation inside a node (issue 12) -------------------------------------------------------


async def test_one_unloadable_submission_fails_alone_and_its_node_mates_serve(layout, tmp_path):
    locked = write_submission(tmp_path, "locked", {})
    locked.chmod(0o000)  # the worker's uid cannot read it: its sandbox refuses that one submission
    broken = write_submission(tmp_path, "broken", {}, imports="raise ImportError('broken on purpose')")
    private = node_layout(layout, tmp_path, "mixed-node")
    server = RunnerServer(RunnerSettings(
        crunch_id=CRUNCH, node_id="mixed-node", models={"counter": COUNTER, "locked": locked, "broken": broken},
        tls=tls.TlsFiles(private.runner_cert("mixed-node"), private.runner_key("mixed-node"), private.ca_cert),
        registry=private.registry, audit_log=tmp_path / "audit.jsonl", base_paths=[BASE_PATH],
    ))
    port = await server.start()  # starts although one model cannot
    node = Node(private, f"127.0.0.1:{port}", "mixed-node")
    try:
        status = server.model_status()
        assert (status["locked"].state, status["locked"].failure_code) == (ModelState.RECOVERING, ErrorCode.SANDBOX_UNAVAILABLE)
        assert "locked" in status["locked"].failure_message or "readable" in status["locked"].failure_message
        counter, = await node.setup("counter")
        assert counter.status == OK
        locked_setup, = await node.setup("locked")
        assert locked_setup.status == FAILURE and "SANDBOX_UNAVAILABLE" in locked_setup.error.code + locked_setup.error.message
        # It keeps retrying on its own, backing off, while its node-mate serves on the same worker.
        await eventually(lambda: server.model_status()["locked"].consecutive_failures >= 3, what="retries")
        for _ in range(3):
            assert (await node.as_model("counter").call("echo", 1)).status == OK
        assert await node.as_model("counter").count() == 3
        # A submission that cannot be imported fails its Setup with its reason; repeated Setups back off.
        first, second, third = await node.setup("broken", "broken", "broken")
        assert (first.status, first.error.code) == (FAILURE, ErrorCode.SETUP_IMPORT_FAILED)
        assert "broken on purpose" in first.error.message and "broken on purpose" in third.error.message
        assert (server.model_status()["broken"].state, server.model_status()["broken"].failure_code) == (
            ModelState.SETUP_FAILED, ErrorCode.SETUP_IMPORT_FAILED
        )
        assert server.model_status()["counter"].state == ModelState.SERVING
    finally:
        await node.close()
        await server.stop()
        locked.chmod(0o755)
