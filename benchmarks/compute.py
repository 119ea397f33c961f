"""Models that compute: N models each burning ~2 ms of CPU per call, this project against the reference.

Usage: python benchmarks/compute.py [--models 50] [--rounds 60]

Not a test: it prints figures for this machine. For each N, in one run, back to back:
  (b) this project as shipped (mTLS, signed tokens, audit, a sandboxed worker per model), the
      orchestrator's default packing (`--stop-models-on-exit --port 0`), one FanOut per node;
  (c) the reference (benchmarks/reference_harness.py), one runner process per model.
Every model is benchmarks/compute_model: a numeric loop, then `return prices`. The loop's length
is calibrated here once at start to ~2 ms of CPU and written beside a copy of the model, so
every model of both projects runs the same loop.

Per configuration: p50 / p99 round time with the two half medians (noise), and the CPU bound:
N x the model's CPU per call (measured here by running that same loop in this process) / the
cores this process may use: no schedule can finish a round faster than that. round / bound is
the figure to judge (target <= 1.15). Server CPU per call minus the model's CPU is what each
call costs on top of the model (runner, worker hop, gRPC); coordinator CPU per call runs on the
same cores and counts against the bound too. Fairness (this project): each model's median
latency over the measured rounds, their spread, and every non-SUCCESS result by reason
(WORKER_STARVED or TIMEOUT must not appear under the default packing). Noise gauge: the CPU
busy outside this benchmark's processes while it ran, in cores (the machine may be shared). It
also counts kernel work done for the benchmark's own traffic outside its processes (loopback
softirq), so it is an upper bound on others' load, not an exact figure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import fanout  # noqa: E402  (sets up the import path of secure_runner too)
import reference_harness  # noqa: E402
from procstat import CLOCK_TICKS, cpu_seconds, descendants  # noqa: E402

from secure_runner import CallStatus  # noqa: E402

COMPUTE_MODEL = BENCH / "compute_model"
CALL_CPU_S = 0.002  # what one call of the model should cost
CORES = len(os.sched_getaffinity(0))


def load_model(folder: Path):
    """The model module, imported here as a worker imports it."""
    sys.path.insert(0, str(BENCH / "reference_model" / "base"))
    spec = importlib.util.spec_from_file_location("compute_bench_model", folder / "main.py")
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    return model


def calibrated_model(folder: Path) -> tuple[Path, float]:
    """A copy of the model in `folder` whose loop costs ~CALL_CPU_S here, and its measured CPU per call.

    Trials double until one costs 20 ms of this process's CPU (a CPU clock may tick coarsely);
    the cheapest of three such runs counts, as the others were disturbed. The count is written
    beside the copy, so every worker of both projects runs the same loop, and the model's CPU
    per call is then measured here on that exact loop (median of 100 calls).
    """
    folder.mkdir()
    shutil.copy(COMPUTE_MODEL / "main.py", folder / "main.py")
    (folder / "iterations").write_text("1")
    burn = load_model(folder).burn

    def cpu_of(iterations: int) -> float:
        started = time.process_time()
        burn(iterations)
        return time.process_time() - started

    trial = 10_000
    while cpu_of(trial) < 0.02:
        trial *= 2
    iterations = max(1, round(trial * CALL_CPU_S / min(cpu_of(trial) for _ in range(3))))
    (folder / "iterations").write_text(str(iterations))
    return folder, statistics.median(cpu_of(iterations) for _ in range(100))


class OtherLoad:
    """Noise gauge: cores busy outside this process tree while the block runs (from /proc/stat; an upper bound).

    Samples every half second the machine's busy time and the CPU of this process and each of
    its descendants (the last figure seen per process counts, so a process that exits loses at
    most half a second of its CPU to "others").
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._own: dict[int, float] = {}
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    @staticmethod
    def _machine_busy() -> float:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / CLOCK_TICKS

    def _sample(self) -> None:
        me = os.getpid()
        for pid in [me, *descendants(me)]:
            self._own[pid] = max(self._own.get(pid, 0.0), cpu_seconds([pid]))

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self) -> OtherLoad:
        self._sample()
        self._own_before = dict(self._own)
        self._busy_before, self._wall_before = self._machine_busy(), time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        own = sum(cpu - self._own_before.get(pid, 0.0) for pid, cpu in self._own.items())
        self.cores = max(0.0, (self._machine_busy() - self._busy_before - own) / (time.monotonic() - self._wall_before))


def fairness(measured_rounds: list[dict]) -> dict:
    """Per-model median latency over the measured rounds, and every non-SUCCESS result by reason."""
    latencies: dict[str, list[int]] = collections.defaultdict(list)
    outcomes: collections.Counter = collections.Counter()
    for results in measured_rounds:
        for model, result in results.items():
            if result.status is CallStatus.SUCCESS:
                latencies[model.model_id].append(result.latency_us)
            else:
                outcomes[f"{result.status}:{result.reason}"] += 1
    medians = sorted(statistics.median(v) / 1e3 for v in latencies.values())
    return {
        "min_ms": medians[0], "median_ms": statistics.median(medians), "max_ms": medians[-1],
        "spread": medians[-1] / medians[0], "bad": dict(outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="50")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    reference_harness.ensure_reference_venv()
    with tempfile.TemporaryDirectory(prefix="compute-bench-") as tmp_name:
        model, model_cpu = calibrated_model(Path(tmp_name) / "model")
        print(f"model CPU per call {model_cpu * 1e3:.2f} ms (measured here), {CORES} cores")
        for n in (int(x) for x in args.models.split(",")):
            seen: list[dict] = []
            with OtherLoad() as ours_noise:
                ours = asyncio.run(fanout.run_ours(n, args.rounds, Path(tmp_name), None, model, seen))
            with OtherLoad() as reference_noise:
                reference = reference_harness.run_reference(n, args.rounds, fanout.PAYLOAD, submission=model)
            half = len(reference["samples_ms"]) // 2
            theirs = {
                "p50_ms": reference["p50_ms"], "p99_ms": reference["p99_ms"],
                "client_cpu_us": reference["client_cpu_us_per_call"], "server_cpu_us": reference["runner_cpu_us_per_call"],
                "halves_ms": (statistics.median(reference["samples_ms"][:half]),
                              statistics.median(reference["samples_ms"][half:])),
            }  # fmt: skip
            _print_block(n, model_cpu, {"b": (ours, ours_noise.cores), "c": (theirs, reference_noise.cores)})
            _print_fairness(fairness(seen[-args.rounds:]))


def _print_block(n: int, model_cpu: float, rows: dict) -> None:
    bound_ms = n * model_cpu / CORES * 1e3
    print(f"\nN = {n} models; CPU bound {bound_ms:.1f} ms per round (N x model CPU / {CORES} cores)")
    print(f"{'config':<14} {'p50 ms':>8} {'(halves)':>15} {'p99 ms':>8} {'p50/bound':>9} {'coord CPU':>10}"
          f" {'server CPU':>11} {'of it extra':>11} {'others used':>11}")  # fmt: skip
    names = {"b": "b  ours", "c": "c  reference"}
    for key, (r, noise) in rows.items():
        halves = "{:.1f}/{:.1f}".format(*r["halves_ms"])
        print(f"{names[key]:<14} {r['p50_ms']:>8.1f} {halves:>15} {r['p99_ms']:>8.1f} {r['p50_ms'] / bound_ms:>9.2f}"
              f" {r['client_cpu_us']:>7.0f} us {r['server_cpu_us']:>8.0f} us"
              f" {r['server_cpu_us'] - model_cpu * 1e6:>8.0f} us {noise:>6.2f} cores")  # fmt: skip
    b, c = rows["b"][0], rows["c"][0]
    print(f"b/c: p50 {b['p50_ms'] / c['p50_ms']:.2f}, coordinator CPU {b['client_cpu_us'] / c['client_cpu_us']:.2f}")


def _print_fairness(fair: dict) -> None:
    print(f"fairness (b): per-model median latency {fair['min_ms']:.1f} / {fair['median_ms']:.1f} /"
          f" {fair['max_ms']:.1f} ms (min / median / max), max/min {fair['spread']:.2f};"
          f" non-SUCCESS results: {fair['bad'] or 'none'}")  # fmt: skip


if __name__ == "__main__":
    main()
