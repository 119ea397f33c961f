"""Opt-in Prometheus metrics for a coordinator: what its fan-outs did, counted in its own process.

A coordinator that wants them makes one `ClientMetrics` and hands it to the concurrent
runner; without one the client does no metrics work at all (one `is None` check per call):

    metrics = ClientMetrics()                      # its own registry, with process_* / python_*
    runner = DynamicSubclassModelConcurrentRunner(..., security=security, metrics=metrics)
    metrics.serve(9095)                            # http://127.0.0.1:9095/metrics
    # or: ClientMetrics(registry=prometheus_client.REGISTRY) to join the coordinator's own
    # registry, or mount `metrics.wsgi_app()` in its web app.

The names are the contract in the README ("Observing a crunch"): calls by model, method,
outcome and reason; the coordinator-side round trip per model result; the whole round's
duration and its number of models; models ready now; disconnections by the limits.

Labels stay bounded whatever the peers send: `method` is a name the coordinator's own code
called and the concurrent runner's allowlist check let through (a peer cannot add one),
`reason` an ErrorCode name or OK (a reason a runner makes up counts as OTHER), `model` an id
from the crunch's model list, capped at MAX_MODEL_LABELS distinct ids (later ones: "other").

Cost: a fan-out records one result per model, so this sits on the hot path. prometheus_client's
own metric objects take a lock per `inc()` / `observe()` (5.5 us per model result, measured on
the 2-core development machine); instead each label combination's tally is resolved once and
kept, the event loop thread (the only writer) adds plain integers to it, and a collector turns
the tallies into metric families when scraped (0.7 us per model result, same measurement).
Reading from the scrape thread needs no lock: it copies each container in one C-level step
under the GIL, and sums a histogram's buckets from its own copy, so its buckets and count always
agree (its sum may hold one observation more or less, which Prometheus tolerates).
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from secure_runner.error_table import OTHER_LABEL, reason_label

if TYPE_CHECKING:
    from secure_runner.client.concurrent_runner import DynamicSubclassModelConcurrentRunner
    from secure_runner.client.results import CallResult
    from secure_runner.metrics import MetricsServer
    from secure_runner.transport.tls import TlsFiles

# Round trips from a loopback echo (under a millisecond) to a model near a minute-long timeout.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MODELS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
MAX_MODEL_LABELS = 10_000  # distinct model ids labelled; a crunch has far fewer
OTHER_MODEL = "other"

CALLS = "secure_runner_client_calls"  # exposed with the counter suffix: secure_runner_client_calls_total
CALL_SECONDS = "secure_runner_client_call_seconds"
FANOUT_SECONDS = "secure_runner_client_fanout_seconds"
FANOUT_MODELS = "secure_runner_client_fanout_models"
MODELS_CONNECTED = "secure_runner_client_models_connected"
DISCONNECTIONS = "secure_runner_client_disconnections"  # exposed as ..._disconnections_total


class _Tally:
    """One counter series: a plain integer the event loop thread adds to."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class _Buckets:
    """One histogram series: observations per bucket (the last one +Inf) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket with value <= le
        self.total += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """(le, cumulative count) pairs ending with +Inf, and the sum, read from the scrape thread."""
        counts, total = list(self.counts), self.total
        pairs, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            running += count
            pairs.append((bound, running))
        return pairs, total


class _MethodSeries:
    """The per-method histograms of one fan-out method."""

    __slots__ = ("call_seconds", "fanout_seconds", "fanout_models")

    def __init__(self) -> None:
        self.call_seconds = _Buckets(SECONDS_BUCKETS)
        self.fanout_seconds = _Buckets(SECONDS_BUCKETS)
        self.fanout_models = _Buckets(MODELS_BUCKETS)


class ClientMetrics:
    """The coordinator's client_* metrics, registered in `registry` (a new one of its own when None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._runners: list[weakref.ref[DynamicSubclassModelConcurrentRunner]] = []
        # (model id, method, status, reason) as the result has them -> the tally of their bounded labels.
        self._call_tallies: dict[tuple[str, str, str, str], _Tally] = {}
        self._calls: dict[tuple[str, str, str, str], _Tally] = {}  # by labels: what is exposed
        self._methods: dict[str, _MethodSeries] = {}
        self._disconnections: dict[str, _Tally] = {}
        self._model_labels: set[str] = set()
        self._servers: list[MetricsServer] = []
        if registry is None:
            registry = CollectorRegistry()
            # The standard process_* and python_* families, as the default registry has them.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        registry.register(self)

    # -- fed by the concurrent runner ---------------------------------------------------

    def track(self, runner: DynamicSubclassModelConcurrentRunner) -> None:
        """Count `runner`'s ready models in secure_runner_client_models_connected (held weakly)."""
        self._runners.append(weakref.ref(runner))

    def record_round(self, method: str, results: Iterable[CallResult], seconds: float) -> None:
        """One fan-out round of `method` that took `seconds`: every result, its latency, the round."""
        series = self._methods.get(method) or self._new_method(method)
        call_seconds = series.call_seconds
        tallies = self._call_tallies
        count = 0
        for result in results:
            count += 1
            key = (result.model.model_id, method, result.status, result.reason)
            (tallies.get(key) or self._call_tally(key)).count += 1
            if result.latency_us:  # 0: never sent (skipped, unavailable), nothing to time
                call_seconds.observe(result.latency_us / 1_000_000)
        series.fanout_seconds.observe(seconds)
        series.fanout_models.observe(count)

    def record_disconnection(self, reason: str) -> None:
        """A model dropped by the limits; `reason` is its last fault's code."""
        label = reason_label(reason)
        tally = self._disconnections.get(label) or self._disconnections.setdefault(label, _Tally())
        tally.count += 1

    def _new_method(self, method: str) -> _MethodSeries:
        return self._methods.setdefault(method, _MethodSeries())

    def _call_tally(self, key: tuple[str, str, str, str]) -> _Tally:
        """The tally for a result's (model id, method, status, reason), kept only when its labels are bounded."""
        model_id, method, status, reason = key
        labelled = model_id in self._model_labels or len(self._model_labels) < MAX_MODEL_LABELS
        if labelled:
            self._model_labels.add(model_id)
        labels = (model_id if labelled else OTHER_MODEL, method, str(status), reason_label(reason))
        tally = self._calls.get(labels) or self._calls.setdefault(labels, _Tally())
        if labelled and labels[3] != OTHER_LABEL:  # made-up reasons and overflow ids are resolved each time
            self._call_tallies[key] = tally
        return tally

    # -- exposition ---------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        """The families this collector exposes (the registry checks names against its others)."""
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        return self._families(
            calls=list(self._calls.items()), methods=list(self._methods.items()),
            disconnections=list(self._disconnections.items()), connected=self._ready_models(),
        )

    def _families(self, calls=(), methods=(), disconnections=(), connected=None) -> Iterator[Metric]:
        family = CounterMetricFamily(
            CALLS, "Model results the coordinator got, by model, method, outcome and reason.",
            labels=("model", "method", "outcome", "reason"),
        )
        for labels, tally in calls:
            family.add_metric(labels, tally.count)
        yield family
        histograms = (
            (CALL_SECONDS, "call_seconds",
             "Coordinator-side round trip per model result (calls sent; models skipped are not timed)."),
            (FANOUT_SECONDS, "fanout_seconds", "Whole fan-out round, from call() to its last result."),
            (FANOUT_MODELS, "fanout_models", "Models targeted per fan-out round (one result each)."),
        )
        for name, attribute, documentation in histograms:
            family = HistogramMetricFamily(name, documentation, labels=("method",))
            for method, series in methods:
                family.add_metric((method,), *getattr(series, attribute).cumulative())
            yield family
        yield GaugeMetricFamily(MODELS_CONNECTED, "Models a call would reach now (READY), over every runner.",
                                value=connected)
        family = CounterMetricFamily(
            DISCONNECTIONS, "Models dropped by the consecutive failure / timeout limits, by their last fault's code.",
            labels=("reason",),
        )
        for label, tally in disconnections:
            family.add_metric((label,), tally.count)
        yield family

    def _ready_models(self) -> int:
        return sum(runner.ready_model_count for ref in list(self._runners) if (runner := ref()) is not None)

    def serve(self, port: int, host: str = "127.0.0.1", *, tls: TlsFiles | None = None) -> int:
        """Serve /metrics on host:port (loopback by default) in a daemon thread; returns the bound port.

        With `tls` it serves over mutual TLS 1.3 as the runners' and orchestrator's `--metrics-tls`
        do (the same server, secure_runner/metrics.py): `tls.cert` / `tls.key` must be a server
        certificate (the coordinator's crunch certificate is for clients only), and only scrapers
        presenting a certificate of `tls.ca` are answered.
        """
        from secure_runner.metrics import MetricsEndpoint, serve_metrics  # only a coordinator that serves pays for it

        server = serve_metrics(self.registry, MetricsEndpoint(port, host, tls=tls is not None), tls)
        self._servers.append(server)
        return server.port

    def wsgi_app(self):
        """A WSGI app exposing this registry's metrics, to mount in the coordinator's own web app."""
        return make_wsgi_app(self.registry)

    def close(self) -> None:
        """Stop every server `serve` started."""
        for server in self._servers:
            server.close()
        self._servers.clear()
