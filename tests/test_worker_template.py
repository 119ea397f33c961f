"""Workers forked from the runner's template (runner/template.py) are as isolated as fresh ones.

Real runners, real forked workers, checked from the outside: the sandbox report is the
same with and without the template; two workers of one node share no descriptor, no
random state and no memory of each other or of the runner (its TLS key is not in a
worker's memory, read by the test through /proc as root); and killing the template
takes no served model down: a worker started afterwards comes from a new template.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from secure_runner import codec
from secure_runner.runner.sandbox.policy import LAYERS
from secure_runner.v1 import runner_pb2

from conftest import write_submission
from test_sandbox import require
from test_worker_trust import Node, node_runner

OK = runner_pb2.CALL_STATUS_SUCCESS
PROBE = (
    "def echo(self, value):\n"
    "        self.kept = value  # held in this worker's memory from now on\n"
    "        import random\n"
    "        return {'fds': sorted(os.listdir('/proc/self/fd')), 'random': random.random(), 'pid': os.getpid()}"
)


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def template_of(runner_pid: int) -> int:
    """The runner's template: its child whose stdin is the control socket (a worker's is /dev/null)."""
    def stdin_of(pid: int) -> str:
        try:
            return os.readlink(f"/proc/{pid}/fd/0")
        except OSError:  # a worker's waiter holds no descriptor at all
            return ""

    (template,) = [pid for pid in children(runner_pid) if stdin_of(pid).startswith("socket:")]
    return template


def worker_of(runner_pid: int, model_id: str) -> int:
    """The process running `model_id`'s code: the pid-1 child of its worker (the one in its cgroup)."""
    for pid in children(runner_pid):
        if f"/{model_id}." in Path(f"/proc/{pid}/cgroup").read_text():
            inner = children(pid)
            return inner[0] if inner else pid
    raise AssertionError(f"no worker for {model_id}")


def memory_holds(pid: int, needle: bytes) -> bool:
    """Does any readable mapping of `pid` contain `needle`? (root reads it through /proc/<pid>/mem)"""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or line.rstrip().endswith("[vvar]"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, OverflowError, ValueError):
                continue
    return False


async def serves_again(client, method: str, *args) -> None:
    """Poll `method` until the model answers it (its worker was killed: the runner starts another)."""
    async def answered() -> bool:
        return (await client.call(method, *args)).status == OK

    for _ in range(150):
        if await answered():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the model did not serve again")


def test_a_forked_worker_reports_the_same_sandbox_layers_as_a_fresh_one():
    reports = {}
    for mode in ("on", "off"):
        check = subprocess.run(
            [sys.executable, "-m", "secure_runner.cli", "sandbox-check", "--worker-template", mode],
            capture_output=True, text=True, timeout=60,
        )
        assert check.returncode in (0, 1), check.stderr[-400:]  # 1: a layer is missing here
        require(check.returncode == 0, f"every sandbox layer on this machine: {check.stdout[-400:]}")
        reports[mode] = [re.sub(r"\d{6,}", "<uid>", line) for line in check.stdout.splitlines()[1:]]
    assert reports["on"] == reports["off"]
    assert sum("[active ]" in line for line in reports["on"]) == len(LAYERS)


async def test_forked_workers_share_no_descriptor_random_state_or_memory(layout, tmp_path):
    probe = write_submission(tmp_path, "probe", {"echo": PROBE}, imports="import os")
    models = {"alpha": probe, "beta": probe}
    with node_runner(layout, tmp_path, "forked-node", models) as (private, runner):
        template = template_of(runner.proc.pid)
        node = Node(private, runner.address, "forked-node")
        assert {s.status for s in await node.setup(*models)} == {OK}
        seen = {}
        for model_id in models:
            response = await node.as_model(model_id).call("echo", f"held-by-{model_id}-{os.urandom(8).hex()}")
            assert response.status == OK, response
            seen[model_id] = codec.from_variant(response.output)
        # Each has stdin, stdout, stderr, its protocol pipes, its payload socket and the listing itself: nothing
        # of the template's, nothing of its node-mate's.
        assert len(seen["alpha"]["fds"]) == len(seen["beta"]["fds"]) == 7
        assert seen["alpha"]["random"] != seen["beta"]["random"]  # `random` reseeded in each fork
        assert seen["alpha"]["pid"] == seen["beta"]["pid"] == 1  # each alone in its PID namespace
        # A worker forked after alpha holds its value has nothing of alpha, nor of the runner's key.
        alpha_value = b"held-by-alpha-"
        assert memory_holds(worker_of(runner.proc.pid, "alpha"), alpha_value)  # the scan finds what is there
        os.kill(worker_of(runner.proc.pid, "beta"), signal.SIGKILL)
        await serves_again(node.as_model("beta"), "count")
        assert template_of(runner.proc.pid) == template  # the same template forked it
        key_body = private.runner_key("forked-node").read_text().splitlines()[1].encode()
        assert memory_holds(runner.proc.pid, key_body)  # the runner has it: the scan would find it
        new_beta = worker_of(runner.proc.pid, "beta")
        assert not memory_holds(new_beta, alpha_value)
        assert not memory_holds(new_beta, key_body)
        assert not memory_holds(template, key_body)
        await node.close()


async def test_killing_the_template_takes_no_model_down_and_a_new_one_forks_the_next_worker(layout, tmp_path):
    counter = write_submission(tmp_path, "counted", {})
    with node_runner(layout, tmp_path, "template-node", {"one": counter, "two": counter}) as (private, runner):
        node = Node(private, runner.address, "template-node")
        assert {s.status for s in await node.setup("one", "two")} == {OK}
        old_template = template_of(runner.proc.pid)
        os.kill(old_template, signal.SIGKILL)
        for model_id in ("one", "two"):  # served on, by the same workers
            assert (await node.as_model(model_id).call("echo", 1)).status == OK
        os.kill(worker_of(runner.proc.pid, "two"), signal.SIGKILL)
        await serves_again(node.as_model("two"), "echo", 2)
        assert template_of(runner.proc.pid) != old_template  # replaced, not given up
        assert (await node.as_model("one").call("echo", 3)).status == OK
        await node.close()


async def test_a_stalled_template_is_given_up_and_the_next_worker_starts_the_plain_way(layout, tmp_path):
    """A template that stops answering costs one SPAWN_TIMEOUT_SECONDS, never a wedged runner."""
    counter = write_submission(tmp_path, "counted", {})
    with node_runner(layout, tmp_path, "stalled-node", {"one": counter}) as (private, runner):
        node = Node(private, runner.address, "stalled-node")
        assert {s.status for s in await node.setup("one")} == {OK}
        stalled = template_of(runner.proc.pid)
        os.kill(stalled, signal.SIGSTOP)  # alive, holding its socket, answering nothing
        os.kill(worker_of(runner.proc.pid, "one"), signal.SIGKILL)
        for _ in range(3):  # a call made while the runner waits on the template can run out its deadline
            with contextlib.suppress(grpc.aio.AioRpcError):
                await serves_again(node.as_model("one"), "echo", 2)  # after the spawn timeout, by a plain worker
                break
        else:
            raise AssertionError("the model never served again")
        assert not Path(f"/proc/{stalled}").exists()  # the stalled template was killed and reaped
        with pytest.raises(ValueError):  # no template until the retry delay has passed
            template_of(runner.proc.pid)
        (worker,) = [pid for pid in children(runner.proc.pid) if "/one." in Path(f"/proc/{pid}/cgroup").read_text()]
        assert children(worker)  # a fresh interpreter's PID-namespace waiter, with the model's process under it
        await node.close()
