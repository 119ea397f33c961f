"""Prometheus metrics of a server process (a runner, the orchestrator) and their own HTTP endpoint.

The names are a contract (README "Observing a crunch", the Grafana dashboard): change none.
Each process keeps its metrics in a registry of its own (with the standard process_* and
python_* families), served only when the operator asks (`--metrics-port`): bound to
loopback by default, or over the crunch's mutual TLS (`--metrics-tls`: the process's own
certificate, and only scrapers presenting a certificate of the crunch CA are answered).

What they may say: counts, durations, states and dates. Every label value comes from a
closed set, whatever a peer sends: `model` a hosted model id (any other: "other"), `method`
a name the model's base class declares ("other" otherwise), `outcome` a CallStatus name,
`reason` and `cause` an ErrorCode name or OK ("OTHER" for anything else), `decision`
allow|deny, `layer` a sandbox layer name, `state` a model state name, `certificate`
server|ca. Never a nonce, a peer's name or address, a key id or a message.

A runner whose endpoint is off counts nothing (runner/server.py keeps no RunnerMetrics then).
Cheap on the hot path when on: a call resolves its labelled children once per label combination
(kept in a dict whose keys are bounded the same way), then one increment and one
observation. Whatever can be read when scraped is computed then, in the scraping thread:
models by state, live sandbox layers, replay cache size, registry age, certificate expiry.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cryptography import x509
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from secure_runner.error_table import OK_LABEL, OTHER_LABEL, reason_label
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.runner.supervisor import ModelHost, ModelState
from secure_runner.transport.tls import TlsFiles, file_version, file_versions
from secure_runner.v1 import runner_pb2

if TYPE_CHECKING:
    from secure_runner.smp.replay import ReplayCache

__all__ = [
    "MetricsEndpoint", "MetricsServer", "OrchestratorMetrics", "ProcessMetrics", "RunnerMetrics", "serve_metrics",
]

OTHER = "other"  # a model id this runner does not host, a method its base class does not declare
OUTCOMES = {
    runner_pb2.CALL_STATUS_SUCCESS: "SUCCESS", runner_pb2.CALL_STATUS_FAILURE: "FAILURE",
    runner_pb2.CALL_STATUS_TIMEOUT: "TIMEOUT",
}
# Model time, from a loopback echo (well under a millisecond) to the longest call a runner allows.
MODEL_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                         60.0, 300.0)
RUNNER_START_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
HANDSHAKE_TIMEOUT_SECONDS = 5.0  # a scraper that does not finish its TLS handshake in this is dropped
REQUEST_TIMEOUT_SECONDS = 10.0  # nor one that does not send its request in this




class ProcessMetrics:
    """What every server process reports: auth decisions, replay cache, registry age, certificate expiry."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # the standard process_* and python_* families
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self._decisions = Counter(
            "secure_runner_auth_decisions_total",
            "Audited decisions (the audit log's lines), by decision (allow|deny) and reason (an ErrorCode name, OK).",
            ("decision", "reason"), registry=registry,
        )
        self._decision_children: dict[tuple[str, str], Counter] = {}
        self._replay_entries = Gauge(
            "secure_runner_replay_cache_entries", "Token nonces remembered against replay.", registry=registry)
        self._registry_age = Gauge(
            "secure_runner_registry_age_seconds", "Seconds since the registry was last loaded (or checked) successfully.",
            registry=registry,
        )
        self._expiry = Gauge(
            "secure_runner_certificate_expiry_timestamp_seconds",
            "Unix time at which this process's certificate (server) or the crunch CA (ca) expires; re-read on renewal.",
            ("certificate",), registry=registry,
        )

    def count_decision(self, decision: str, reason: str) -> None:
        """One audited decision; `reason` is an ErrorCode or OK (see transport/decisions.py)."""
        child = self._decision_children.get((decision, reason))
        if child is None:  # keys are bounded: the recorder passes only ALLOW/DENY and ErrorCode names or OK
            child = self._decision_children[(decision, reason)] = self._decisions.labels(decision, reason)
        child.inc()

    def watch(self, *, replay: ReplayCache, registry_fetched_at: Callable[[], float], tls: TlsFiles) -> None:
        """Compute the gauges of this process's replay cache, registry source and TLS files when scraped."""
        self._replay_entries.set_function(replay.__len__)
        self._registry_age.set_function(lambda: max(0.0, time.time() - registry_fetched_at()))
        self._expiry.labels("server").set_function(_CertificateExpiry(tls.cert))
        self._expiry.labels("ca").set_function(_CertificateExpiry(tls.ca))


class _CertificateExpiry:
    """notAfter of the first certificate in a PEM file, re-read only when the file changed (a renewal)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._version: tuple[int, int, int] | None = None
        self._not_after = float("nan")

    def __call__(self) -> float:
        version = file_version(self._path)
        if version is not None and version != self._version:
            try:
                certificate = x509.load_pem_x509_certificates(self._path.read_bytes())[0]
            except (OSError, ValueError, IndexError):
                version = None
            else:
                self._version, self._not_after = version, certificate.not_valid_after_utc.timestamp()
        return float("nan") if version is None else self._not_after  # unreadable now: unknown, never a stale date


class RunnerMetrics(ProcessMetrics):
    """A runner's metrics; `hosts` is the server's own model id -> ModelHost dict (read when scraped)."""

    def __init__(self, hosts: Mapping[str, ModelHost]) -> None:
        super().__init__()
        self._hosts = hosts
        registry = self.registry
        self._calls = Counter(
            "secure_runner_runner_calls_total", "Calls of hosted models (Call and each model of a FanOut), by outcome.",
            ("model", "method", "outcome", "reason"), registry=registry,
        )
        self._call_children: dict[tuple[str, str, int, str], Counter] = {}
        self._model_seconds = Histogram(
            "secure_runner_runner_model_seconds", "Time inside the worker of calls its model answered.",
            ("method",), registry=registry, buckets=MODEL_SECONDS_BUCKETS,
        )
        self._seconds_children: dict[str, Histogram] = {}
        self._restarts = Counter(
            "secure_runner_worker_restarts_total", "Workers replaced (or their replacement retried) after a failure.",
            ("model", "cause"), registry=registry,
        )
        self._startup = Gauge(
            "secure_runner_runner_startup_seconds", "From the process's start to serving.", registry=registry)
        registry.register(_HostedModels(hosts))

    def count_call(self, model_id: str, method: str, response: runner_pb2.CallResponse) -> None:
        """A hosted model's answer (or the failure given in its place) to one call."""
        host = self._hosts.get(model_id)
        model = model_id if host is not None else OTHER
        method = method if host is not None and method in host.methods else OTHER
        key = (model, method, response.status, response.error.code)
        child = self._call_children.get(key)
        if child is None:
            outcome = OUTCOMES.get(response.status, OTHER_LABEL)
            reason = OK_LABEL if response.status == runner_pb2.CALL_STATUS_SUCCESS else reason_label(response.error.code)
            child = self._calls.labels(model, method, outcome, reason)
            if reason_label(key[3]) != OTHER_LABEL:  # a made-up code is resolved each time, never kept
                self._call_children[key] = child
        child.inc()
        if response.model_latency_us:  # 0: no answer from the worker (a timeout, a refusal)
            seconds = self._seconds_children.get(method)
            if seconds is None:
                seconds = self._seconds_children[method] = self._model_seconds.labels(method)
            seconds.observe(response.model_latency_us / 1_000_000)

    def count_refusal(self, model_id: str, method: str, code: ErrorCode) -> None:
        """A call refused before its model was asked (MODEL_UNKNOWN, METHOD_NOT_ALLOWED, ...): a FAILURE."""
        self.count_call(model_id, method, runner_pb2.CallResponse(
            status=runner_pb2.CALL_STATUS_FAILURE, error={"code": code}))

    def count_restart(self, model_id: str, cause: str) -> None:
        """A hosted model's worker failed with `cause` and is being replaced (supervisor.ModelHost.on_failure)."""
        self._restarts.labels(model_id if model_id in self._hosts else OTHER, reason_label(cause)).inc()

    def serving(self) -> None:
        """The runner serves from now: its start-up time is set once."""
        self._startup.set(seconds_since_process_start())


class _HostedModels(Collector):
    """secure_runner_models{state} and secure_runner_sandbox_layer_active{model,layer}, computed at scrape."""

    def __init__(self, hosts: Mapping[str, ModelHost]) -> None:
        self._hosts = hosts

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("secure_runner_models", "Models this runner hosts, by state.", labels=("state",)),
            GaugeMetricFamily("secure_runner_sandbox_layer_active",
                              "Sandbox layers of each live worker: 1 in force, 0 missing.", labels=("model", "layer")),
        )

    def collect(self) -> Iterable[GaugeMetricFamily]:
        models, layers = self._families()
        hosts = list(self._hosts.items())  # one atomic copy: the event loop may add or retire models meanwhile
        states = dict.fromkeys(ModelState, 0)
        for model_id, host in hosts:
            states[host.status.state] += 1
            for layer in host.layers:
                layers.add_metric((model_id, layer.name), 1.0 if layer.active else 0.0)
        for state, count in states.items():
            models.add_metric((state.value,), count)
        return models, layers


class OrchestratorMetrics(ProcessMetrics):
    """The orchestrator's metrics; `board_states` gives the state name of each model on its board."""

    def __init__(self, board_states: Callable[[], Iterable[str]], state_names: Iterable[str]) -> None:
        super().__init__()
        self.runner_start = Histogram(
            "secure_runner_orchestrator_runner_start_seconds", "From launching a runner to its READY.",
            registry=self.registry, buckets=RUNNER_START_BUCKETS,
        )
        self.registry.register(_BoardStates(board_states, tuple(state_names)))


class _BoardStates(Collector):
    def __init__(self, board_states: Callable[[], Iterable[str]], state_names: tuple[str, ...]) -> None:
        self._board_states, self._names = board_states, state_names

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [self._family()]

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "secure_runner_orchestrator_models", "Models on the orchestrator's board, by state.", labels=("state",))

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = dict.fromkeys(self._names, 0)
        for state in self._board_states():
            if state in counts:
                counts[state] += 1
        family = self._family()
        for state, count in counts.items():
            family.add_metric((state,), count)
        return [family]


def seconds_since_process_start() -> float:
    """This process's age: its start time in /proc (clock ticks of the boot-time clock) against that clock now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return time.monotonic() - _IMPORTED_AT
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")


_IMPORTED_AT = time.monotonic()


# -- the endpoint ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where a process serves its metrics: `port` (0: any free one), `host`, over mutual TLS if `tls`."""

    port: int = 0
    host: str = "127.0.0.1"
    tls: bool = False


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_SECONDS  # a scraper that holds a connection open without asking is dropped

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not logged (one line every few seconds would drown the process's own)."""


class _MetricsHTTPServer(ThreadingMixIn, WSGIServer):
    """HTTP(S) server, one thread per scrape; with `tls`, the handshake is done in that thread.

    So a client that connects and stays silent holds one thread for HANDSHAKE_TIMEOUT_SECONDS,
    never the accepting thread (which a TLS-wrapped listening socket would block).
    """

    daemon_threads = True
    tls: _ServerTls | None = None

    def finish_request(self, request, client_address) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
        try:
            wrapped = self.tls.context().wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):  # no certificate, another CA, a TLS 1.2 client, a port scan: no answer
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


class _ServerTls:
    """The server side of mutual TLS 1.3 with `files`: client certificates required, from the crunch CA.

    The context is rebuilt when a file changed (a renewal), as the gRPC side reloads its own.
    """

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._version: tuple | None = None
        self._context = self._load()

    def _load(self) -> ssl.SSLContext:
        try:
            version = file_versions(self._files)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self._files.ca))
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_cert_chain(str(self._files.cert), str(self._files.key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(ErrorCode.PKI_INVALID, f"metrics TLS: cannot use {self._files.cert}: {exc}") from None
        self._version = version
        return context

    def context(self) -> ssl.SSLContext:
        with self._lock:
            try:
                if file_versions(self._files) != self._version:
                    self._context = self._load()
            except (OSError, ConfigError):
                pass  # half-renewed files: keep serving with the pair that worked
            return self._context


class MetricsServer:
    """A running metrics endpoint: its bound `port`; `close()` stops it."""

    def __init__(self, server: _MetricsHTTPServer) -> None:
        self._server = server
        self.port: int = server.server_port
        self._thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(registry: CollectorRegistry, endpoint: MetricsEndpoint, tls: TlsFiles) -> MetricsServer:
    """Serve `registry` at http(s)://host:port/metrics in a daemon thread (`tls`: this process's own files)."""
    try:
        server = make_server(endpoint.host, endpoint.port, make_wsgi_app(registry), _MetricsHTTPServer,
                             handler_class=_QuietHandler)
    except OSError as exc:
        raise ConfigError(ErrorCode.INVALID_VALUE,
                          f"cannot serve metrics on {endpoint.host}:{endpoint.port}: {exc.strerror or exc}") from None
    if endpoint.tls:
        try:
            server.tls = _ServerTls(tls)
        except ConfigError:
            server.server_close()
            raise
    return MetricsServer(server)
