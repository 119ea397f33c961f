"""The runner's control pipe (`runner/control.py`): one hosted model stopped, the others untouched.

Real runner processes with their sandboxed workers and real TLS; the test holds the
runner's stdin as its parent would, and watches the worker processes in /proc.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc

from secure_runner import pki
from secure_runner.errors import ErrorCode
from secure_runner.v1 import runner_pb2

from conftest import MODELS, RawCoordinator, RunnerProcess, assert_refused, fresh_pki, write_submission

COUNTER = MODELS / "submissions" / "counter"
NODE = "node-0"


def worker_pids(runner_pid: int) -> dict[str, int]:
    """Submission folder name -> pid of the runner's worker for it, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone meanwhile
        if ppid == runner_pid and b"secure_runner.runner.worker" in argv:
            found[Path(json.loads(argv[4])["submission"]).name] = int(entry.name)
    return found


async def test_malformed_control_lines_are_refused_and_the_runner_serves_on(layout, tmp_path):
    private = pki.PkiLayout(shutil.copytree(layout.root, tmp_path / "pki"))
    pki.issue_runner_certificate(private, NODE)
    runner = RunnerProcess(
        private, "counter", None, "--model", f"async-model={MODELS / 'submissions' / 'async-model'}",
        "--node-id", NODE, control=True,
    )
    try:
        refused = {
            b"": ErrorCode.MALFORMED_REQUEST,
            b"HELLO counter": ErrorCode.MALFORMED_REQUEST,
            b"stop counter": ErrorCode.MALFORMED_REQUEST,
            b"STOP": ErrorCode.INVALID_VALUE,
            b"STOP Counter": ErrorCode.INVALID_VALUE,
            b"STOP counter now": ErrorCode.INVALID_VALUE,
            b"STOP \xffcounter": ErrorCode.INVALID_VALUE,
            b"STOP ghost": ErrorCode.MODEL_UNKNOWN,
            b"REDEPLOY " + b"a" * 200: ErrorCode.MALFORMED_REQUEST,
            b"x" * 10_000 + b"STOP counter": ErrorCode.MALFORMED_REQUEST,  # dropped whole, tail included
        }
        assert {line: runner.command(line) for line in refused} == {
            line: f"ERROR {code}" for line, code in refused.items()
        }
        coordinators = {m: RawCoordinator(private, runner.address, m, server_model_id=NODE) for m in ("counter", "async-model")}
        for coordinator in coordinators.values():
            assert (await coordinator.setup()).status == runner_pb2.CALL_STATUS_SUCCESS
        assert await coordinators["counter"].count() == 0

        assert runner.command(b"STOP counter") == "OK STOP counter"
        await assert_refused(coordinators["counter"].call("count"), grpc.StatusCode.NOT_FOUND, ErrorCode.MODEL_UNKNOWN)
        assert (await coordinators["async-model"].call("echo", 1)).status == runner_pb2.CALL_STATUS_SUCCESS
        for coordinator in coordinators.values():
            await coordinator.close()

        runner.proc.stdin.close()  # end of file: the parent is gone
        assert runner.proc.wait(10) == 0
    finally:
        runner.stop()


async def test_a_model_stopped_mid_call_gets_no_new_worker_even_if_that_call_crashes_it(tmp_path):
    layout = fresh_pki(tmp_path, "crasher", "steady")
    pki.issue_runner_certificate(layout, NODE)
    crasher = write_submission(
        tmp_path, "crasher", {"echo": "def echo(self, value):\n        time.sleep(value)\n        os._exit(3)"},
        imports="import os\nimport time",
    )
    runner = RunnerProcess(layout, "crasher", crasher, "--model", f"steady={COUNTER}", "--node-id", NODE, control=True)
    coordinator = RawCoordinator(layout, runner.address, "crasher", server_model_id=NODE)
    try:
        assert (await coordinator.setup()).status == runner_pb2.CALL_STATUS_SUCCESS
        call = asyncio.create_task(coordinator.call("echo", 0.5))
        await asyncio.sleep(0.2)  # the call is in the model
        assert runner.command(b"STOP crasher") == "OK STOP crasher"  # once the call ended
        assert (await call).error.code == ErrorCode.WORKER_CRASHED
        await asyncio.sleep(1.0)  # a restart scheduled by the crash (no backoff for a first one) would be up
        assert set(worker_pids(runner.proc.pid)) == {"counter"}
    finally:
        await coordinator.close()
        runner.stop()
