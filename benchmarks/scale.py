"""Scale: hundreds to a thousand models on one host, this project against the reference.

Usage: python benchmarks/scale.py [--models 100,500,1000] [--rounds 20]
                                  [--reference-models 100,300] [--fresh-workers 100,300]

Not a test: it prints figures for this machine. For each N of `--models`, this project in the
default packing (the orchestrator, `--stop-models-on-exit --port 0`: one runner per core, ceil(N /
cores) models each), every worker forked from its runner's template (runner/template.py); for
each N of `--fresh-workers`, the same with every worker a fresh interpreter (the runners'
`--worker-template off`, the way before the template), for old-vs-new figures from one run.
Per cell:
  ready     seconds from starting the orchestrator to the first full fan-out answered (all N set up);
  USS/model private memory of every process the orchestrator started (runners, templates, workers
            and their PID-namespace waiters: Private_Clean + Private_Dirty from smaps_rollup),
            summed and divided by N, read with the models idle after the rounds;
  p50, p50/N the round time of `echo(prices)` (100 floats, JSON) to all N, and per model;
  coord CPU the coordinator's CPU per round (this process: client, gRPC core, signing).
The reference (benchmarks/reference_harness.py: one insecure runner process per model) runs at
each N of `--reference-models` that fits in the memory available (REFERENCE_MB_PER_MODEL each),
stopping at the first N it cannot run; its largest N gives the per-model p50 the issue's target compares with. The noise gauge repeats
the fastest cell of this project and prints the spread of the two. Everything started here is
killed on return or Ctrl-C, runners included (they outlive an orchestrator by design).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import reference_harness  # noqa: E402
from fanout import BASE_CLASS, PAYLOAD, orchestrator_crunch  # noqa: E402  the same model and payload as fanout.py
from procstat import descendants, uss_mb  # noqa: E402

from secure_runner import Argument, CallStatus, CoordinatorSecurity, DynamicSubclassModelConcurrentRunner  # noqa: E402
from secure_runner import Variant, VariantType, encode_data  # noqa: E402
from secure_runner.runner.sandbox.options import WORKER_TEMPLATE_ENV  # noqa: E402

CRUNCH = "scale-bench"
# What one reference runner keeps to itself (~57 MB private of its ~126 MB RSS, issue 16): an N is run
# only if N of them fit in MemAvailable with the headroom to spare (the machine may be shared).
REFERENCE_MB_PER_MODEL = 60
MEMORY_HEADROOM_MB = 4096
READY_LIMIT_SECONDS = 600


def _ints(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def _available_mb() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _kill_leftovers(pids: list[int]) -> None:
    """SIGKILL the processes still alive that this benchmark started (checked by command line)."""
    for pid in pids:
        try:
            if b"secure_runner" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


async def run_ours(n: int, rounds: int, tmp: Path, template: bool) -> dict:
    """This project at N models in the default packing; `template` False: fresh-interpreter workers."""
    folder, layout, command = orchestrator_crunch(n, tmp, crunch=CRUNCH)
    env = dict(os.environ, **{WORKER_TEMPLATE_ENV: "on" if template else "off"})  # the runners inherit it
    started = time.perf_counter()
    orchestrator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    client, started_pids = None, []
    try:
        port = int(orchestrator.stdout.readline().split()[1])
        client = DynamicSubclassModelConcurrentRunner(
            timeout=60, crunch_id=CRUNCH, host="127.0.0.1", port=port, base_classname=BASE_CLASS,
            security=CoordinatorSecurity.from_pki_dir(layout.root), connect_timeout=300,
        )
        await client.init()
        arguments = [Argument(position=1, data=Variant(type=VariantType.JSON, value=encode_data(VariantType.JSON, PAYLOAD)))]

        async def one_round() -> list:
            results = await client.call("echo", arguments)
            failed = [(r.model_id, r.reason, r.message) for r in results.values() if r.status is not CallStatus.SUCCESS]
            return failed + [("missing", n - len(results), "")] * (len(results) != n)

        while failed := await one_round():  # ready: the first round all N answer
            assert time.perf_counter() - started < READY_LIMIT_SECONDS, failed[:3]
        ready = time.perf_counter() - started
        for _ in range(3):  # warm-up
            await one_round()
        times, cpu, failures = [], time.process_time(), []
        for _ in range(rounds):
            begun = time.perf_counter()
            failures += await one_round()
            times.append(time.perf_counter() - begun)
        cpu = time.process_time() - cpu
        assert not failures, failures[:3]
        await asyncio.sleep(1.0)  # idle: what the models keep between calls
        started_pids = descendants(orchestrator.pid)
        private: dict[str, list[float]] = {}
        for pid in started_pids:
            private.setdefault(_kind(pid), []).append(uss_mb(pid))
        p50 = statistics.median(times)
        return {
            "ready_s": ready, "uss_per_model_mb": sum(map(sum, private.values())) / n, "p50_ms": p50 * 1e3,
            "per_model_us": p50 / n * 1e6, "coord_cpu_ms": cpu / rounds * 1e3,
            "uss_by_kind": {kind: (len(values), sum(values)) for kind, values in sorted(private.items())},
        }
    finally:
        started_pids = started_pids or descendants(orchestrator.pid)
        if client is not None:
            await client.close()
        orchestrator.terminate()
        try:
            orchestrator.wait(60)
        except subprocess.TimeoutExpired:
            orchestrator.kill()
            orchestrator.wait()
        _kill_leftovers(started_pids)
        shutil.rmtree(folder, ignore_errors=True)


def _kind(pid: int) -> str:
    """runner, template (its stdin is the control socket), worker, or a worker's PID-namespace waiter."""
    try:
        if b"secure_runner.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return "runner"
        return "template" if os.readlink(f"/proc/{pid}/fd/0").startswith("socket:") else "worker"
    except FileNotFoundError:
        return "waiter"  # no descriptor at all (runner/sandbox/namespaces.py)
    except OSError:
        return "gone"


def run_reference(n: int, rounds: int) -> dict:
    result = reference_harness.run_reference(n, rounds, PAYLOAD)
    return {
        "ready_s": result["ready_s"], "rss_per_model_mb": result["runner_rss_mb"], "p50_ms": result["p50_ms"],
        "per_model_us": result["p50_ms"] / n * 1e3, "coord_cpu_ms": result["client_cpu_us_per_call"] * n / 1e3,
    }


def _row(name: str, n: int, r: dict) -> str:
    memory = f"{r['uss_per_model_mb']:>7.2f} USS" if "uss_per_model_mb" in r else f"{r['rss_per_model_mb']:>7.1f} RSS"
    return (f"{name:<22} {n:>5} {r['ready_s']:>8.1f} {memory:>12} {r['p50_ms']:>9.1f} {r['per_model_us']:>8.1f}"
            f" {r['coord_cpu_ms']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="100,500,1000", help="N for this project (template workers)")
    parser.add_argument("--fresh-workers", default="100,300", help="N for this project with fresh-interpreter workers")
    parser.add_argument("--reference-models", default="100,200,300", help="N for the reference (those that fit)")
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds per cell")
    args = parser.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):  # unwind (and kill what was started) even from a background job
        signal.signal(sig, signal.default_int_handler)
    logging.getLogger("secure_runner").setLevel(logging.ERROR)  # the client's retried Setups while N start
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    cells: list[tuple[str, int, dict]] = []
    try:
        for n in _ints(args.models):
            cells.append(("ours (template)", n, asyncio.run(run_ours(n, args.rounds, tmp, True))))
            print(_row(*cells[-1]), flush=True)
        for n in _ints(args.fresh_workers):
            cells.append(("ours (fresh workers)", n, asyncio.run(run_ours(n, args.rounds, tmp, False))))
            print(_row(*cells[-1]), flush=True)
        for n in _ints(args.reference_models):
            needed = n * REFERENCE_MB_PER_MODEL + MEMORY_HEADROOM_MB
            if needed > _available_mb():
                print(f"reference at N = {n}: skipped, needs ~{needed:.0f} MB, {_available_mb():.0f} MB available")
                continue
            try:
                cells.append(("reference", n, run_reference(n, args.rounds)))
            except reference_harness.ReferenceStackError as exc:
                print(f"reference at N = {n}: could not run ({str(exc)[:300]}); stopping there")
                break
            print(_row(*cells[-1]), flush=True)
        ours = [(n, r) for name, n, r in cells if name == "ours (template)"]
        noise = None
        if ours:
            fastest_n = min(n for n, _r in ours)
            noise = (fastest_n, asyncio.run(run_ours(fastest_n, args.rounds, tmp, True)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _report(cells, noise)


def _report(cells: list[tuple[str, int, dict]], noise: tuple[int, dict] | None) -> None:
    print(f"\n{'configuration':<22} {'N':>5} {'ready s':>8} {'MB/model':>12} {'p50 ms':>9} {'p50/N us':>8}"
          f" {'coord CPU':>9}")
    print(f"{'':<22} {'':>5} {'':>8} {'':>12} {'':>9} {'':>8} {'ms/round':>9}")
    for cell in cells:
        print(_row(*cell))
        if "uss_by_kind" in cell[2]:
            print(" " * 24 + "USS by process: " + ", ".join(
                f"{count} {kind} {total / count:.2f} MB each" for kind, (count, total) in cell[2]["uss_by_kind"].items()))
    by = {(name, n): r for name, n, r in cells}
    print("\nratios")
    for (name, n), fresh in sorted(by.items()):
        new = by.get(("ours (template)", n))
        if name == "ours (fresh workers)" and new:
            print(f"  N = {n}: template / fresh workers: ready {new['ready_s'] / fresh['ready_s']:.2f}x,"
                  f" USS per model {new['uss_per_model_mb'] / fresh['uss_per_model_mb']:.2f}x,"
                  f" p50 {new['p50_ms'] / fresh['p50_ms']:.2f}x")
    references = sorted(n for name, n in by if name == "reference")
    for (name, n), reference in sorted(by.items()):
        if name == "reference" and (ours := by.get(("ours (template)", n))):
            print(f"  N = {n}: ours / reference: ready {ours['ready_s'] / reference['ready_s']:.2f}x,"
                  f" p50 {ours['p50_ms'] / reference['p50_ms']:.2f}x,"
                  f" coordinator CPU {ours['coord_cpu_ms'] / reference['coord_cpu_ms']:.2f}x")
    if references:
        largest = by[("reference", references[-1])]
        for (name, n), ours in sorted(by.items()):
            if name == "ours (template)":
                print(f"  p50/N at N = {n} against the reference's at its largest N ({references[-1]}):"
                      f" {ours['per_model_us'] / largest['per_model_us']:.3f}x (target <= 0.25 at N = 1000)")
    if noise is not None:
        n, again = noise
        first = by[("ours (template)", n)]
        print(f"noise gauge (ours, N = {n}, run twice): p50 {first['p50_ms']:.1f} / {again['p50_ms']:.1f} ms"
              f" ({abs(first['p50_ms'] / again['p50_ms'] - 1) * 100:.0f}% apart), ready {first['ready_s']:.1f} /"
              f" {again['ready_s']:.1f} s, USS/model {first['uss_per_model_mb']:.2f} / {again['uss_per_model_mb']:.2f} MB")


if __name__ == "__main__":
    main()
