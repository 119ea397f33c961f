"""`secure-runner status` against a real orchestrator process: on a terminal, through a pipe, as JSON.

The orchestrator runs as `secure-runner orchestrator` (one runner process hosting three
models: `alpha` answers, `flaky` raises in every call, `broken` cannot even be read by
its worker); the status command runs as its own process with the test PKI's operator
(or coordinator) credentials. A call made by a real coordinator before must show up as
each model's last call (status, latency, failure reason), from the runner's own counters.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from secure_runner.client.results import CallStatus
from secure_runner.runner.call_stats import CallStats

from conftest import (
    CRUNCH, MODELS, by_id, connected, free_port, fresh_pki, json_args, orchestrator_process, write_submission,
)

MODEL_IDS = ("alpha", "broken", "flaky")
ESCAPE = "\x1b"


@pytest.fixture(scope="module")
def crunch(tmp_path_factory):
    """(layout, port) of an orchestrator process whose three models share one runner."""
    root = tmp_path_factory.mktemp("status")
    layout = fresh_pki(root, *MODEL_IDS)
    submissions = root / "submissions"
    submissions.mkdir()
    (submissions / "alpha").symlink_to(MODELS / "submissions" / "counter")
    write_submission(submissions, "flaky", {"echo": "def echo(self, value):\n        raise ValueError('no echo today')"})
    broken = shutil.copytree(MODELS / "submissions" / "counter", submissions / "broken")
    broken.chmod(0o000)  # its worker (another uid) cannot read it: it never comes up
    try:
        with orchestrator_process(layout, submissions, "--models-per-node", "3") as port:
            yield layout, port
    finally:
        broken.chmod(0o755)


def status_command(layout, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "secure_runner.cli", "status", "--crunch", CRUNCH, "--port", str(port),
            "--pki", str(layout.root), *args]


def status(layout, port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(status_command(layout, port, *args), capture_output=True, text=True, timeout=30)


def status_json(layout, port: int, *args: str) -> dict:
    done = status(layout, port, "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def until(probe, what: str, timeout: float = 20.0):
    """Call `probe` until it returns something true (the orchestrator polls runners every 2 s)."""
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return found


async def test_a_call_shows_up_as_last_result_in_json_and_in_the_plain_table(crunch):
    layout, port = crunch
    async with connected(layout, port) as client:
        assert await client.ready(10, ["alpha", "flaky"])
        results = by_id(await client.call("echo", json_args(7), models=["alpha", "flaky"]))
    assert (results["alpha"].status, results["flaky"].status) == (CallStatus.SUCCESS, CallStatus.FAILURE)

    def counted() -> dict | None:
        doc = status_json(layout, port)
        models = {m["model_id"]: m for m in doc["models"]}
        ready = all((models[m]["calls"] or {}).get("count") for m in ("alpha", "flaky"))
        return models if ready and models["broken"]["state"] == "RECOVERING" else None

    models = until(counted, "the call on the operators' list, and broken RECOVERING")
    alpha, flaky, broken = models["alpha"], models["flaky"], models["broken"]
    assert alpha["state"] == flaky["state"] == "RUNNING" and alpha["uptime_seconds"] >= 0
    assert alpha["node_id"] == flaky["node_id"] == broken["node_id"] == "node-0"
    assert alpha["deployment_id"] and alpha["address"] and alpha["restarts"] == 0
    assert alpha["calls"]["count"] == 1 and alpha["calls"]["failures"] == 0
    assert alpha["calls"]["last_status"] == "SUCCESS" and alpha["calls"]["last_latency_us"] > 0
    assert alpha["calls"]["last_call_ms"] > 0
    assert (flaky["calls"]["last_status"], flaky["calls"]["failures"]) == ("FAILURE", 1)
    assert flaky["calls"]["last_failure_code"] == results["flaky"].reason
    assert "no echo today" in flaky["calls"]["last_failure_message"]
    assert broken["state_reason"] and broken["uptime_seconds"] is None and broken["calls"]["count"] == 0

    plain = status(layout, port)
    assert plain.returncode == 0 and ESCAPE not in plain.stdout, plain.stderr
    header, *lines = plain.stdout.splitlines()
    assert header.split()[:3] == ["MODEL", "STATE", "UPTIME"] and len(lines) == len(MODEL_IDS)
    rows = {line.split()[0]: line for line in lines}
    assert rows["alpha"].split()[1] == "RUNNING" and " SUCCESS " in rows["alpha"]
    assert rows["broken"].split()[1] == "RECOVERING"
    assert "last failed call:" in rows["flaky"] and "no echo today" in rows["flaky"]


def test_on_a_terminal_the_table_is_redrawn_in_place_until_ctrl_c(crunch):
    layout, port = crunch
    pid, terminal = pty.fork()
    if pid == 0:  # the child: its stdout is the pseudo-terminal
        os.execv(sys.executable, status_command(layout, port, "--interval", "0.3"))
    seen = ""
    try:
        deadline = time.monotonic() + 20
        while seen.count("\x1b[H") < 2 or not all(m in seen for m in MODEL_IDS):
            assert time.monotonic() < deadline, f"no second frame: {seen!r}"
            if select.select([terminal], [], [], 0.5)[0]:
                seen += os.read(terminal, 65536).decode(errors="replace")
        os.kill(pid, signal.SIGINT)
        while True:  # read to the end, so the child never blocks on a full terminal
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk.decode(errors="replace")
        _, wait_status = os.waitpid(pid, 0)
    finally:
        os.close(terminal)
    assert os.waitstatus_to_exitcode(wait_status) == 0  # a clean exit, no KeyboardInterrupt traceback
    assert seen.startswith("\x1b[?1049h") and seen.rstrip().endswith("\x1b[?1049l")  # the screen given back
    assert "Traceback" not in seen
    frame = seen.split("\x1b[H")[-1]
    lines = {line.split()[0]: line.split() for line in frame.replace("\x1b[K", "").splitlines() if line.strip()}
    assert lines["alpha"][1] == "RUNNING" and lines["broken"][1] in ("STARTING", "RUNNING", "RECOVERING")


def test_a_coordinator_sees_the_board_without_counters(crunch):
    layout, port = crunch
    doc = status_json(layout, port, "--as", "coordinator")
    assert doc["source"] == "coordinator" and {m["model_id"] for m in doc["models"]} == set(MODEL_IDS)
    assert all(m["calls"] is None and m["restarts"] is None and m["node_id"] == "node-0" for m in doc["models"])


def test_unreachable_orchestrator_and_refused_credentials_are_one_line_errors(crunch, tmp_path):
    layout, port = crunch
    down = status(layout, free_port())
    assert down.returncode == 2 and down.stderr.startswith("secure-runner status: error: UNREACHABLE")
    assert "Traceback" not in down.stderr
    coordinator = (layout.coordinator_cert, layout.coordinator_key, layout.coordinator_identity)
    refused = status(layout, port, "--cert", str(coordinator[0]), "--key", str(coordinator[1]),
                     "--identity", str(coordinator[2]))  # a coordinator's files where an operator's belong
    assert refused.returncode == 2 and "PEER_UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr
    assert refused.stdout == ""


@pytest.mark.parametrize("change", [
    {"calls": -1}, {"calls": "1"}, {"failures": True}, {"last_latency_us": 1 << 63}, {"last_status": "ROGUE"},
    {"last_failure_code": "X" * 65}, {"last_failure_message": "x" * 201}, {"last_failure_message": None},
    {"extra": 1},
])
def test_counters_of_another_type_or_size_in_a_status_answer_are_refused(change):
    """What the orchestrator accepts from a runner's STATUS answer (its LauncherError: unreadable answer)."""
    good = CallStats(calls=2, failures=1, last_status="TIMEOUT", last_latency_us=5, last_call_ms=1,
                     last_failure_code="MODEL_TIMEOUT", last_failure_message="x" * 200)
    assert CallStats.from_fields(good.fields()) == good
    with pytest.raises(ValueError):
        CallStats.from_fields({**good.fields(), **change})


def test_plain_watch_prints_a_fresh_table_every_interval_into_a_pipe(crunch):
    """`--watch` off a terminal: whole tables one after another (for a log file), no escape codes."""
    layout, port = crunch
    with subprocess.Popen(status_command(layout, port, "--watch", "--interval", "0.5"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as watching:
        headers, lines = 0, []
        deadline = time.monotonic() + 20
        while headers < 3:
            assert time.monotonic() < deadline, f"only {headers} tables: {lines}"
            line = watching.stdout.readline()
            lines.append(line)
            headers += line.split()[:2] == ["MODEL", "STATE"]
        watching.send_signal(signal.SIGINT)
        _rest, errors = watching.communicate(timeout=10)
    assert watching.returncode == 0, errors
    assert not any(ESCAPE in line for line in lines)
    tables = "".join(lines).split("MODEL ")[1:]
    assert all({row.split()[0] for row in table.splitlines()[1:] if row.strip()} >= set(MODEL_IDS)
               for table in tables[:2])  # every model in each full table
