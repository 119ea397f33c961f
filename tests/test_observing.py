"""Observing a crunch (issue 15): a real orchestrator, its runners and a coordinator, scraped over HTTP.

The orchestrator runs as `secure-runner orchestrator --metrics-port 0`; its runners are found
through the Prometheus file_sd file it writes, as Prometheus finds them (deploy/observability/
prometheus.yml); the coordinator mounts the client's `ClientMetrics` and serves it. One fan-out
to three good models, one that raises and one that outlives the call's timeout must move every
counter by exactly that, on both sides, and the auth decisions counted must be the audit log's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from secure_runner import CallStatus
from secure_runner.client import metrics as client_metrics
from secure_runner.client.metrics import ClientMetrics
from secure_runner.client.results import CallResult, ModelIdentity
from secure_runner.errors import ErrorCode
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.transport import tls

from conftest import BASE_PATH, CRUNCH, by_id, eventually, fresh_pki, json_args, make_client, write_submission

GOOD = ("good-a", "good-b", "good-c")
CALL_TIMEOUT_SECONDS = 2.0
NODES = 2  # five models, three per runner
Samples = dict[tuple[str, frozenset], float]


def _scrape(address: str) -> Samples:
    """Every sample an endpoint serves, by (sample name, labels)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


def _by(samples: Samples, name: str, *keys: str) -> Counter:
    """`name`'s non-zero samples summed by the labels `keys`."""
    totals: Counter = Counter()
    for (sample, labels), value in samples.items():
        if sample == name and value:
            label = dict(labels)
            totals[tuple(label.get(key, "") for key in keys)] += value
    return totals


def _merged(scrapes: list[Samples]) -> Samples:
    merged: dict = {}
    for samples in scrapes:
        for key, value in samples.items():
            merged[key] = merged.get(key, 0.0) + value
    return merged


def _allow_lines(audit_log: Path, rpcs: tuple[str, ...] | None = None) -> int:
    """Allowed requests the audit log recorded (all, or only those of `rpcs`)."""
    count = 0
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("decision") == "allow" and (rpcs is None or entry["what"].get("rpc", "").rsplit("/", 1)[-1] in rpcs):
            count += 1
    return count


@pytest.fixture
def crunch(tmp_path):
    """Five models: three good, one raising, one sleeping past any call's timeout; the orchestrator's metrics on."""
    code = tmp_path / "code"
    code.mkdir()
    good = write_submission(code, "good", {})  # the stub echo returns its value
    sources = dict.fromkeys(GOOD, good) | {
        "raises": write_submission(code, "raises", {"echo": "def echo(self, value):\n        raise ValueError('no')"}),
        "sleeps": write_submission(code, "sleeps", {"echo": "def echo(self, value):\n        time.sleep(60)"},
                                   imports="import time"),
    }
    layout = fresh_pki(tmp_path, *sources)
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    for model_id, source in sources.items():
        (submissions / model_id).symlink_to(source)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "secure_runner.cli", "orchestrator", "--crunch", CRUNCH,
            "--submissions", str(submissions), "--pki", str(layout.root), "--base-path", str(BASE_PATH),
            "--log-level", "WARNING", "--stop-models-on-exit", "--port", "0", "--metrics-port", "0",
            "--models-per-node", "3",  # two runners, both reached by a FanOut
        ],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        yield layout, int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(30)


def _targets(layout) -> dict[str, list[str]]:
    """The orchestrator's file_sd file: its own endpoint and its runners', by role."""
    targets: dict[str, list[str]] = {"orchestrator": [], "runner": []}
    path = layout.root.parent / "state" / "metrics-targets.json"
    for group in json.loads(path.read_text()) if path.exists() else ():
        targets[group["labels"]["role"]].extend(group["targets"])
    return targets


async def test_one_fan_out_moves_every_counter_by_exactly_what_happened(crunch):
    layout, port = crunch
    metrics = ClientMetrics()
    client = make_client(layout, port, timeout=CALL_TIMEOUT_SECONDS, metrics=metrics)
    coordinator = f"127.0.0.1:{metrics.serve(0)}"
    try:
        await client.init()
        assert await client.ready(30)
        # The file follows the runners as they come up, like Prometheus, not necessarily before the models.
        await eventually(lambda: len(_targets(layout)["runner"]) == NODES, timeout=10, what="every runner listed")
        targets = _targets(layout)
        (orchestrator,) = targets["orchestrator"]
        runners = targets["runner"]
        ready = await asyncio.to_thread(_scrape, coordinator)
        assert _value(ready, "secure_runner_client_models_connected") == 5
        before = _merged([await asyncio.to_thread(_scrape, runner) for runner in runners])

        results = by_id(await client.call("echo", json_args(7)))

        assert {m: (r.status, r.reason) for m, r in results.items()} == {
            **dict.fromkeys(GOOD, (CallStatus.SUCCESS, "")),
            "raises": (CallStatus.FAILURE, ErrorCode.MODEL_RAISED),
            "sleeps": (CallStatus.TIMEOUT, ErrorCode.MODEL_TIMEOUT),
        }
        happened = Counter({
            **{(m, "echo", "SUCCESS", "OK"): 1 for m in GOOD},
            ("raises", "echo", "FAILURE", "MODEL_RAISED"): 1,
            ("sleeps", "echo", "TIMEOUT", "MODEL_TIMEOUT"): 1,
        })

        # The coordinator: one result per model, each timed; one round of five models.
        seen = await asyncio.to_thread(_scrape, coordinator)
        assert _by(seen, "secure_runner_client_calls_total", "model", "method", "outcome", "reason") == happened
        assert _value(seen, "secure_runner_client_call_seconds_count", method="echo") == 5
        assert _value(seen, "secure_runner_client_fanout_seconds_count", method="echo") == 1
        assert _value(seen, "secure_runner_client_fanout_models_count", method="echo") == 1
        assert _value(seen, "secure_runner_client_fanout_models_sum", method="echo") == 5
        assert _by(seen, "secure_runner_client_disconnections_total", "reason") == Counter()  # limits are 3
        assert _value(seen, "process_cpu_seconds_total") > 0  # the standard collectors are on

        # The runners counted the same calls (the timed-out one once its runner cut it off), and
        # replaced the sleeping model's worker, for that reason and no other.
        def runner_side() -> Samples:
            return _merged([_scrape(runner) for runner in runners])  # blocks the loop briefly: nothing waits on it

        after: Samples = {}

        def runners_caught_up() -> bool:
            nonlocal after
            after = runner_side()
            return _value(after, "secure_runner_worker_restarts_total") >= 1 and sum(
                _by(after, "secure_runner_runner_calls_total", "model").values()) >= 5

        await eventually(runners_caught_up, timeout=15, what="the runners' counts")
        assert _by(before, "secure_runner_runner_calls_total", "model") == Counter()  # Setup is no call
        assert _by(after, "secure_runner_runner_calls_total", "model", "method", "outcome", "reason") == happened
        assert _by(after, "secure_runner_worker_restarts_total", "model", "cause") == Counter(
            {("sleeps", "MODEL_TIMEOUT"): 1})
        # Model time for every answer its worker gave (the raise included), none for the timeout.
        assert _value(after, "secure_runner_runner_model_seconds_count", method="echo") == 4
        assert _value(after, "secure_runner_models") == 5
        for model_id in (*GOOD, "raises"):
            assert _value(after, "secure_runner_sandbox_layer_active", model=model_id) >= 1
        assert _value(after, "secure_runner_runner_startup_seconds") > 0

        # Auth: what the metrics counted is what the audit logs recorded, and the round was one
        # authorized request per node (one FanOut, or a Call for a node with one model).
        audit = layout.root.parent / "audit"
        runner_logs = sorted(audit.glob("runner-*.jsonl"))
        assert len(runner_logs) == len(runners)
        round_allows = sum(_allow_lines(log, ("Call", "FanOut")) for log in runner_logs)
        assert round_allows == NODES

        def decisions_agree() -> bool:
            allowed = _value(runner_side(), "secure_runner_auth_decisions_total", decision="allow")
            return allowed == sum(_allow_lines(log) for log in runner_logs) and allowed == _value(
                runner_side(), "secure_runner_auth_decisions_total", decision="allow")

        await eventually(decisions_agree, timeout=10, what="runner allow count = audit allow lines")
        assert _value(after, "secure_runner_auth_decisions_total", decision="deny") == 0

        # The orchestrator: its board, its runners' start-up, its own decisions (the model-list stream).
        board = await asyncio.to_thread(_scrape, orchestrator)
        assert _by(board, "secure_runner_orchestrator_models", "state") == Counter({("RUNNING",): 5})
        assert _value(board, "secure_runner_orchestrator_runner_start_seconds_count") == len(runners)
        assert _value(board, "secure_runner_auth_decisions_total", decision="allow") == _allow_lines(
            audit / "orchestrator.jsonl")
        assert _value(board, "secure_runner_auth_decisions_total", decision="deny") == 0
        for samples in [board, *map(_scrape, runners)]:  # each process's own
            assert 0 <= _value(samples, "secure_runner_registry_age_seconds") < 60
            for certificate in ("server", "ca"):
                expiry = _value(samples, "secure_runner_certificate_expiry_timestamp_seconds", certificate=certificate)
                assert time.time() < expiry < time.time() + 400 * 86400
    finally:
        await client.close()
        metrics.close()


def test_client_labels_stay_bounded_whatever_a_runner_answers(monkeypatch):
    """A runner's made-up reason counts as OTHER; model ids past the cap count as "other"."""
    monkeypatch.setattr(client_metrics, "MAX_MODEL_LABELS", 2)
    metrics = ClientMetrics()
    results = [
        CallResult(ModelIdentity(f"m{i}", "", "", "", "d"), CallStatus.FAILURE, reason=f"nonce-{i}", latency_us=10)
        for i in range(4)
    ]
    metrics.record_round("echo", results, 0.01)
    metrics.record_round("echo", results, 0.01)
    (calls,) = (family for family in metrics.registry.collect() if family.name == "secure_runner_client_calls")
    assert {(s.labels["model"], s.labels["reason"]): s.value for s in calls.samples} == {
        ("m0", "OTHER"): 2, ("m1", "OTHER"): 2, ("other", "OTHER"): 4,
    }


def test_a_coordinator_can_serve_its_metrics_over_mutual_tls(layout):
    """`serve(tls=...)`: TLS 1.3, and only a scraper with a certificate of the crunch CA is answered.

    The server certificate here is a runner's (a coordinator's own certificate is for clients only).
    """
    metrics = ClientMetrics()
    port = metrics.serve(0, tls=tls.TlsFiles(layout.runner_cert("counter"), layout.runner_key("counter"), layout.ca_cert))
    server_name = PeerIdentity.make(CRUNCH, Role.RUNNER, "counter").tls_server_name

    def scrape(client_certificate: bool) -> str:
        context = ssl.create_default_context(cafile=str(layout.ca_cert))
        if client_certificate:
            context.load_cert_chain(str(layout.coordinator_cert), str(layout.coordinator_key))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as sock:
                assert sock.version() == "TLSv1.3"
                answer = b""
                with contextlib.suppress(ssl.SSLError, ConnectionError):  # refused: an alert, a reset or nothing
                    sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    while chunk := sock.recv(65536):
                        answer += chunk
        return answer.decode()

    try:
        assert "# TYPE secure_runner_client_fanout_seconds histogram" in scrape(client_certificate=True)
        assert scrape(client_certificate=False) == ""
    finally:
        metrics.close()
