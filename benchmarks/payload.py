"""Payload size: one argument of 64 KiB, 1 MiB or 16 MiB fanned out to N models that read it.

Usage: python benchmarks/payload.py [--quick] [--models 1,10] [--sizes 64K,1M,16M] [--rounds 20]

Not a test: it prints figures for this machine. Every model (benchmarks/payload_model) reads the
whole value and returns a small summary ({"n", "sum"}). Payloads, each encoded once before its
rounds as a coordinator would (sizes near the label: the table prints them; Parquet of random
floats runs 15-25% over, as random floats do not compress):
  PARQUET  a pandas DataFrame of 8 float64 columns of random floats, written by pyarrow's Parquet
           writer with its defaults (what the reference client's `encode_data` writes);
  JSON     a list of random floats in [0, 1) (as in issue 16), `json.dumps` for the reference;
  NDARRAY  a float64 array (this project only: the reference has no NDARRAY).
Configurations, in one run: (b) this project as shipped (mTLS, signed tokens, sandboxed workers,
the orchestrator's default packing); (c) the reference (PyPI crunch-model-runner +
model-runner-client, no security, one runner process per model), installed by
benchmarks/reference_harness.py, its coordinator benchmarks/_payload_reference_client.py.
Per cell: p50 round time with the medians of the two halves of the rounds (the noise gauge),
coordinator CPU per model call, and the ratio b/c of p50s and of coordinator CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import reference_harness as ref  # noqa: E402
from secure_runner import (  # noqa: E402
    Argument,
    CallStatus,
    CoordinatorSecurity,
    DynamicSubclassModelConcurrentRunner,
    Variant,
    VariantType,
    encode_data,
    pki,
)

CRUNCH = "payload-bench"
MODEL = BENCH / "payload_model"
REFERENCE_CLIENT = BENCH / "_payload_reference_client.py"
SIZES = {"64K": 64 * 1024, "1M": 1024 * 1024, "16M": 16 * 1024 * 1024}
COLUMNS = 8
REFERENCE_TYPES = {"PARQUET", "JSON"}


@dataclass
class Payload:
    name: str  # e.g. "PARQUET 1M"
    type_name: str
    value: Any  # what this project's coordinator encodes
    reference_bytes: bytes  # what the reference client's encode_data makes of it
    count: int  # the "n" every model must answer
    rounds: int


def make_payloads(sizes: list[str], rounds: int, quick: bool) -> list[Payload]:
    rng = np.random.default_rng(16)
    payloads = []
    for label in sizes:
        size = SIZES[label]
        cell_rounds = max(3, rounds // {"64K": 1, "1M": 2, "16M": 4}[label] // (2 if quick else 1))
        rows = size // (8 * COLUMNS)
        frame = pd.DataFrame(rng.random((rows, COLUMNS)), columns=[f"c{i}" for i in range(COLUMNS)])
        floats = rng.random(size // 20).tolist()  # about 20 bytes each in JSON
        array = rng.random(size // 8)
        payloads += [
            Payload(f"PARQUET {label}", "PARQUET", frame, encode_data(VariantType.PARQUET, frame), rows, cell_rounds),
            Payload(f"JSON {label}", "JSON", floats, json.dumps(floats).encode(), len(floats), cell_rounds),
            Payload(f"NDARRAY {label}", "NDARRAY", array, b"", len(array), cell_rounds),
        ]
    return payloads


def cell(samples_s: list[float], cpu_s: float, calls: int) -> dict:
    half = len(samples_s) // 2
    return {
        "p50_ms": statistics.median(samples_s) * 1e3,
        "halves_ms": (statistics.median(samples_s[:half]) * 1e3, statistics.median(samples_s[half:]) * 1e3),
        "cpu_ms_per_call": cpu_s / calls * 1e3,
    }


def warmup_rounds(payload: Payload) -> int:
    return 1 if payload.name.endswith("16M") else 2


# -- (b) this project ---------------------------------------------------------------------------


async def run_ours(n: int, payloads: list[Payload], tmp: Path) -> dict[str, dict]:
    folder = Path(tempfile.mkdtemp(dir=tmp))
    model_ids = [f"m{i:04d}" for i in range(n)]
    layout = pki.make_test_pki(folder / "pki", CRUNCH, [pki.ModelSpec(m, m, "alice", "Alice") for m in model_ids])
    (folder / "submissions").mkdir()
    for model_id in model_ids:
        (folder / "submissions" / model_id).symlink_to(MODEL)
    orchestrator = subprocess.Popen(
        [sys.executable, "-m", "secure_runner.cli", "orchestrator", "--crunch", CRUNCH,
         "--submissions", str(folder / "submissions"), "--pki", str(layout.root),
         "--base-path", str(ref.MODEL_BASE), "--log-level", "ERROR", "--port", "0", "--stop-models-on-exit"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    client = None
    try:
        port = int(orchestrator.stdout.readline().split()[1])
        client = DynamicSubclassModelConcurrentRunner(
            timeout=120, crunch_id=CRUNCH, host="127.0.0.1", port=port, base_classname=ref.BASE_CLASSNAME,
            security=CoordinatorSecurity.from_pki_dir(layout.root), connect_timeout=120,
        )
        await client.init()
        cells = {}
        for payload in payloads:
            variant_type = VariantType.Value(payload.type_name)
            arguments = [Argument(position=1, data=Variant(type=variant_type, value=encode_data(variant_type, payload.value)))]
            samples, cpu = [], 0.0
            for round_number in range(warmup_rounds(payload) + payload.rounds):
                cpu_before, started = time.process_time(), time.perf_counter()
                results = await client.call("echo", arguments)
                if round_number >= warmup_rounds(payload):
                    samples.append(time.perf_counter() - started)
                    cpu += time.process_time() - cpu_before
                wrong = [(r.model_id, r.reason, r.message) for r in results.values()
                         if r.status is not CallStatus.SUCCESS or r.output["n"] != payload.count]  # fmt: skip
                assert len(results) == n and not wrong, (payload.name, wrong[:3])
            cells[payload.name] = cell(samples, cpu, payload.rounds * n)
        return cells
    finally:
        if client is not None:
            await client.close()
        orchestrator.terminate()
        orchestrator.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


# -- (c) the reference ----------------------------------------------------------------------------


def run_reference(n: int, payloads: list[Payload], tmp: Path) -> dict[str, dict]:
    """N reference runners hosting benchmarks/payload_model, its fake orchestrator, our driver of its client."""
    root = ref.ensure_reference_venv()
    work = Path(tempfile.mkdtemp(dir=tmp))
    listed = []
    for index, payload in enumerate(payloads):
        (work / f"payload-{index}").write_bytes(payload.reference_bytes)
        listed.append({"name": payload.name, "type": payload.type_name, "file": str(work / f"payload-{index}"),
                       "n": payload.count, "rounds": payload.rounds, "warmup": warmup_rounds(payload)})  # fmt: skip
    (work / "payloads.json").write_text(json.dumps(listed))
    models = [{"model_id": f"m{i:04d}", "port": port} for i, port in enumerate(ref._free_ports(n))]
    (work / "models.json").write_text(json.dumps(models))
    processes, readers = [], []
    try:
        for model in models:
            processes.append(subprocess.Popen(
                [str(ref.runner_python(root)), "-c", ref.RUNNER_BOOT, "--address", f"{ref.HOST}:{model['port']}",
                 "--code-directory", str(MODEL), "--resource-directory", str(work)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work,
                env=ref._child_env({"PYTHONPATH": str(ref.MODEL_BASE)}),
            ))  # fmt: skip
        client_env = ref._child_env({})
        orchestrator = subprocess.Popen(
            [str(ref.client_python(root)), "-c", ref.PDEATHSIG_PRELUDE + ref.DRIVER_BOOT, "orchestrator",
             "--models", str(work / "models.json"), "--crunch-id", ref.CRUNCH_ID],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=work, env=client_env,
        )  # fmt: skip
        processes.append(orchestrator)
        readers.append(ref._LineReader(orchestrator, "fake orchestrator"))
        _, listening = readers[-1].expect({"LISTENING"}, timeout=60)
        boot = f"sys.argv[0] = {str(REFERENCE_CLIENT)!r}\nimport runpy\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
        driver = subprocess.Popen(
            [str(ref.client_python(root)), "-c", ref.PDEATHSIG_PRELUDE + boot, "--port", str(listening["port"]),
             "--crunch-id", ref.CRUNCH_ID, "--base-classname", ref.BASE_CLASSNAME, "--n-models", str(n),
             "--payloads", str(work / "payloads.json")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=work, env=client_env,
        )  # fmt: skip
        processes.append(driver)
        readers.append(ref._LineReader(driver, "reference client"))
        readers[-1].expect({"READY"}, timeout=180 + 2 * n)
        cells = {}
        for _ in payloads:
            _, body = readers[-1].expect({"CELL"}, timeout=600)
            if body["bad"]:
                raise ref.ReferenceStackError(f"{body['name']}: {body['bad']} results failed or miscounted")
            cells[body["name"]] = cell(body["samples_s"], body["cpu_s"], len(body["samples_s"]) * n)
        return cells
    finally:
        ref._stop_all(processes)
        for reader in readers:
            reader.close()
        shutil.rmtree(work, ignore_errors=True)


# -- report ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1,10")
    parser.add_argument("--sizes", default="64K,1M,16M")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per 64K cell (fewer for larger sizes)")
    parser.add_argument("--quick", action="store_true", help="half the rounds (for a shared machine)")
    args = parser.parse_args()
    payloads = make_payloads(args.sizes.split(","), args.rounds, args.quick)
    ours, theirs = {}, {}
    with tempfile.TemporaryDirectory(prefix="payload-bench-") as tmp_name:
        for n in (int(x) for x in args.models.split(",")):
            ours[n] = asyncio.run(run_ours(n, payloads, Path(tmp_name)))
            theirs[n] = run_reference(n, [p for p in payloads if p.type_name in REFERENCE_TYPES], Path(tmp_name))
            _print_table(n, payloads, ours[n], theirs[n])


def _print_table(n: int, payloads: list[Payload], ours: dict, theirs: dict) -> None:
    print(f"\nN = {n} model(s); p50 round ms (half medians); coordinator CPU ms per model call")
    print(f"{'payload':<13} {'bytes':>9} {'rounds':>6} {'b ours p50':>11} {'(halves)':>15} {'c ref p50':>10}"
          f" {'(halves)':>15} {'b/c':>5} {'CPU b':>7} {'CPU c':>7} {'CPU b/c':>7}")  # fmt: skip
    for payload in payloads:
        b, c = ours[payload.name], theirs.get(payload.name)
        size = len(encode_data(VariantType.Value(payload.type_name), payload.value))
        row = f"{payload.name:<13} {size:>9} {payload.rounds:>6} {b['p50_ms']:>11.1f} {'{:.1f}/{:.1f}'.format(*b['halves_ms']):>15}"
        if c is None:
            print(f"{row} {'-':>10} {'':>15} {'-':>5} {b['cpu_ms_per_call']:>7.2f} {'-':>7} {'-':>7}")
            continue
        print(f"{row} {c['p50_ms']:>10.1f} {'{:.1f}/{:.1f}'.format(*c['halves_ms']):>15}"
              f" {b['p50_ms'] / c['p50_ms']:>5.2f} {b['cpu_ms_per_call']:>7.2f} {c['cpu_ms_per_call']:>7.2f}"
              f" {b['cpu_ms_per_call'] / c['cpu_ms_per_call']:>7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
