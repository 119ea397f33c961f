"""The runner's and the orchestrator's Prometheus metrics, scraped from real processes.

Real runner and orchestrator subprocesses with `--metrics-port 0` (the bound port is in the
READY line), real calls (and refusals) over mTLS, then a scrape over HTTP(S) parsed with
prometheus_client's own parser. The counters must have moved by exactly what happened,
agree with the audit log line for line (one decision recorder feeds both), and carry no
label value outside the closed sets (no peer, no nonce, no key id).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from secure_runner import codec
from secure_runner.client.results import CallStatus
from secure_runner.errors import ErrorCode
from secure_runner.orchestrator.local import STATE_NAMES
from secure_runner.runner.sandbox.policy import LAYERS
from secure_runner.runner.supervisor import ModelState
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import runner_pb2

from conftest import (
    BASE_PATH, CALL_RPC, CRUNCH, MODELS, RawCoordinator, RunnerProcess, assert_refused, by_id, connected, fresh_pki,
)

COUNTER = MODELS / "submissions" / "counter"
# Every label value a server's metrics may carry (the contract in secure_runner/metrics.py).
BOUNDED = (
    {"counter", "alpha", "other", "echo", "count", "hang", "fail", "SUCCESS", "FAILURE", "TIMEOUT", "OK", "OTHER",
     "allow", "deny", "server", "ca", "orchestrator", "runner"}
    | set(ErrorCode) | set(LAYERS) | {state.value for state in ModelState} | set(STATE_NAMES)
)


def scrape(port: int, context: ssl.SSLContext | None = None) -> dict[str, dict[tuple, float]]:
    """secure_runner_* samples by name, then by sorted label items."""
    scheme = "https" if context else "http"
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/metrics", timeout=10, context=context) as answer:
        text = answer.read().decode()
    samples: dict[str, dict[tuple, float]] = collections.defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    assert "process_cpu_seconds_total" in samples and "python_info" in samples  # the standard families stay on
    return {name: values for name, values in samples.items() if name.startswith("secure_runner_")}


def value(samples, name: str, **labels) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def label_sets(samples) -> set[tuple]:
    return {(name, labels) for name, values in samples.items() for labels in values}


def label_values(samples) -> set[str]:
    """Every label value but histogram bucket bounds (`le`)."""
    return {v for _name, labels in label_sets(samples) for key, v in labels if key != "le"}


def port_of(target_group: dict) -> int:
    return int(target_group["targets"][0].rsplit(":", 1)[1])


def scraper_tls(layout, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context trusting the crunch CA (the server's name is a SPIFFE-style DNS name, not 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(layout.ca_cert))
    context.check_hostname = False  # the chain is still verified against the crunch CA
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on, from its socket descriptors and /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}") if os.path.islink(f"/proc/{pid}/fd/{fd}") else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(scope="module")
def metered_runner(layout):
    runner = RunnerProcess(layout, "counter", COUNTER, "--metrics-port", "0", "--metrics-tls")
    yield runner
    runner.stop()


def test_metrics_are_off_by_default(runners):
    runner = runners["counter"]
    assert listening_ports(runner.proc.pid) == {runner.port}  # the gRPC port, nothing else


async def test_runner_counts_exactly_what_happened(layout, metered_runner):
    runner = metered_runner
    port = runner.metrics_port
    crunch = scraper_tls(layout, layout.coordinator_cert, layout.coordinator_key)
    before = scrape(port, crunch)
    assert value(before, "secure_runner_runner_calls_total", model="counter", method="echo", outcome="SUCCESS",
                 reason="OK") == 0

    async def session() -> dict:
        """One client's calls (its own connection: another peer port, other nonces), then a scrape."""
        client = RawCoordinator(layout, runner.address, "counter")
        try:
            assert (await client.setup()).status == runner_pb2.CALL_STATUS_SUCCESS
            for _ in range(2):
                assert (await client.call("echo", 7)).status == runner_pb2.CALL_STATUS_SUCCESS
            await assert_refused(client.call("secret_method"), grpc.StatusCode.PERMISSION_DENIED,
                                 ErrorCode.METHOD_NOT_ALLOWED)
            body = client.call_body("echo", 1)
            await assert_refused(client.raw(CALL_RPC, body), grpc.StatusCode.UNAUTHENTICATED, ErrorCode.TOKEN_MISSING)
            forged = ((TOKEN_KEY, client.token(client.call_body("echo", 2), method="echo")),)
            await assert_refused(client.raw(CALL_RPC, body, forged), grpc.StatusCode.UNAUTHENTICATED,
                                 ErrorCode.TOKEN_BODY_MISMATCH)
        finally:
            await client.close()
        return scrape(port, crunch)

    after_one = await session()
    calls = {labels: n for labels, n in after_one["secure_runner_runner_calls_total"].items() if n}
    assert calls == {
        (("method", "echo"), ("model", "counter"), ("outcome", "SUCCESS"), ("reason", "OK")): 2,
        (("method", "other"), ("model", "counter"), ("outcome", "FAILURE"), ("reason", "METHOD_NOT_ALLOWED")): 1,
    }
    assert value(after_one, "secure_runner_runner_model_seconds_count", method="echo") == 2
    assert 0 < value(after_one, "secure_runner_runner_model_seconds_sum", method="echo") < 1
    # Decisions: counted by the recorder that writes the audit line, so both agree exactly.
    audited = collections.Counter((e["decision"], e["code"]) for e in runner.audit_entries())
    counted = {(dict(k)["decision"], dict(k)["reason"]): n
               for k, n in after_one["secure_runner_auth_decisions_total"].items() if n}
    assert counted == dict(audited) == {("allow", "OK"): 4, ("deny", "METHOD_NOT_ALLOWED"): 1,
                                        ("deny", "TOKEN_MISSING"): 1, ("deny", "TOKEN_BODY_MISMATCH"): 1}
    assert value(after_one, "secure_runner_replay_cache_entries") == 4  # the nonces of the four accepted tokens
    assert value(after_one, "secure_runner_models", state="SERVING") == 1
    assert value(after_one, "secure_runner_models", state="RECOVERING") == 0
    layers = {dict(k)["layer"]: v for k, v in after_one["secure_runner_sandbox_layer_active"].items()}
    assert set(layers) == set(LAYERS) and all(layers.values())  # every layer in force here (root)
    assert 0 <= value(after_one, "secure_runner_registry_age_seconds") < 5
    assert 0 < value(after_one, "secure_runner_runner_startup_seconds") < time.time() - runner.started_at + 1
    not_after = x509.load_pem_x509_certificate(layout.runner_cert("counter").read_bytes()).not_valid_after_utc
    assert value(after_one, "secure_runner_certificate_expiry_timestamp_seconds", certificate="server") == \
        not_after.timestamp()
    assert value(after_one, "secure_runner_certificate_expiry_timestamp_seconds", certificate="ca") > time.time()

    # A second client: the same label sets, twice the counts.
    after_two = await session()
    assert label_sets(after_two) == label_sets(after_one)
    assert label_values(after_two) <= BOUNDED
    for name in ("secure_runner_runner_calls_total", "secure_runner_auth_decisions_total"):
        assert {k: 2 * n for k, n in after_one[name].items()} == after_two[name]

    # A call past its deadline: a TIMEOUT, and the worker replaced for MODEL_TIMEOUT.
    client = RawCoordinator(layout, runner.address, "counter")
    try:
        assert (await client.call("hang", 30, timeout=1.0)).status == runner_pb2.CALL_STATUS_TIMEOUT
    finally:
        await client.close()
    after_timeout = scrape(port, crunch)
    assert value(after_timeout, "secure_runner_runner_calls_total", model="counter", method="hang", outcome="TIMEOUT",
                 reason="MODEL_TIMEOUT") == 1
    assert {dict(k)["cause"]: n for k, n in after_timeout["secure_runner_worker_restarts_total"].items()} == \
        {"MODEL_TIMEOUT": 1}


def test_mutual_tls_metrics_answer_only_crunch_certificates(layout, other_layout, metered_runner):
    port = metered_runner.metrics_port
    for refused in (scraper_tls(layout), scraper_tls(layout, other_layout.coordinator_cert,
                                                     other_layout.coordinator_key)):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            scrape(port, refused)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP on the TLS port
        scrape(port)
    assert scrape(port, scraper_tls(layout, layout.operator_cert, layout.operator_key))


async def test_orchestrator_serves_its_metrics_and_lists_its_runners(tmp_path):
    layout = fresh_pki(tmp_path, "alpha")
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    (submissions / "alpha").symlink_to(COUNTER)
    state = tmp_path / "state"
    orchestrator = subprocess.Popen(
        [sys.executable, "-m", "secure_runner.cli", "orchestrator", "--crunch", CRUNCH, "--submissions",
         str(submissions), "--pki", str(layout.root), "--base-path", str(BASE_PATH), "--port", "0",
         "--state-dir", str(state), "--audit-dir", str(tmp_path / "audit"), "--stop-models-on-exit",
         "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        ready = orchestrator.stdout.readline().split()
        assert ready[0] == "READY" and ready[2].startswith("metrics="), ready
        port, metrics = int(ready[1]), int(ready[2].removeprefix("metrics="))
        targets = json.loads((state / "metrics-targets.json").read_text())
        assert targets[0] == {"targets": [f"127.0.0.1:{metrics}"], "labels": {"role": "orchestrator"}}
        assert [t["labels"] for t in targets[1:]] == [{"role": "runner", "node": "alpha"}]
        async with connected(layout, port) as client:
            results = by_id(await client.call("echo", codec.encode_arguments([5], {})[0]))
            assert results["alpha"].status == CallStatus.SUCCESS
        samples = scrape(metrics)
        assert value(samples, "secure_runner_orchestrator_models", state="RUNNING") == 1
        assert value(samples, "secure_runner_orchestrator_models", state="STOPPED") == 0
        assert value(samples, "secure_runner_orchestrator_runner_start_seconds_count") == 1
        assert value(samples, "secure_runner_auth_decisions_total", decision="allow", reason="OK") == 1  # WatchModels
        assert label_values(samples) <= BOUNDED
        runner_samples = scrape(port_of(targets[1]))  # plain HTTP, like its orchestrator
        assert value(runner_samples, "secure_runner_runner_calls_total", model="alpha", method="echo",
                     outcome="SUCCESS", reason="OK") == 1
        # The runner dies: its replacement's endpoint (a new port) replaces it in the targets file.
        with sqlite3.connect(state / "orchestrator.sqlite") as db:
            (handle,), = db.execute("SELECT handle FROM nodes WHERE node_id = 'alpha'")
        os.kill(json.loads(handle)["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (now := json.loads((state / "metrics-targets.json").read_text()))[1:] in ([], targets[1:]):
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.1)
        assert value(scrape(port_of(now[1])), "secure_runner_models", state="READY") == 1  # up, no Setup yet
        assert value(scrape(metrics), "secure_runner_orchestrator_runner_start_seconds_count") == 2
    finally:
        orchestrator.terminate()
        assert orchestrator.wait(30) == 0
