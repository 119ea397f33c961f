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
For this project's 16 MiB cells, also each node's extra memory during a fan-out: after the timed
rounds, a separate sampler process reads every node (a runner and its workers, found under the
orchestrator in /proc) every few milliseconds through two more, untimed rounds; the node where
its peak less its idle figure just before them is largest is printed, as a multiple of the
encoded payload. A node's memory is the private pages of its processes (USS) plus each memfd
they hold or map, counted once at its size (the shared payload: its pages are left out of the
private sums).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import select
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
from procstat import descendants  # noqa: E402
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


# -- a node's memory ---------------------------------------------------------------------------------

MEMFD_PREFIX = "/memfd:"
MEMORY_ROUNDS = 2  # untimed rounds of a 16 MiB payload, sampled by another process
PRIVATE_FIELDS = ("Private_Clean:", "Private_Dirty:")


def _private(pid: int) -> int:
    """USS: the process's private pages (the kernel's sum)."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        return sum(int(line.split()[1]) * 1024 for line in rollup if line.startswith(PRIVATE_FIELDS))


def _private_outside_memfds(pid: int) -> int:
    """USS without memfd mappings (a memfd mapped by one process alone shows as private there)."""
    private, in_memfd = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # a mapping's first line: address range, perms, offset, dev, inode, path
                in_memfd = MEMFD_PREFIX in line
            elif head in PRIVATE_FIELDS and not in_memfd:
                private += int(line.split()[1]) * 1024
    return private


def _process_bytes(pid: int, memfds: dict[int, int]) -> int:
    """`pid`'s private pages outside memfds; each memfd it maps or holds goes to `memfds` (inode: size)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            mapped = [line.split(maxsplit=5) for line in maps if MEMFD_PREFIX in line]
        for fields in mapped:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            memfds[int(fields[4])] = max(memfds.get(int(fields[4]), 0), end - start)
        private = _private_outside_memfds(pid) if mapped else _private(pid)
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(MEMFD_PREFIX):
                    status = os.stat(f"/proc/{pid}/fd/{fd}")
                    memfds[status.st_ino] = max(memfds.get(status.st_ino, 0), status.st_size)
        return private
    except OSError:  # the process is gone
        return 0


def node_bytes(pids: list[int]) -> int:
    """A node's memory now (`pids`: its runner and workers): private pages plus each memfd among them, once."""
    memfds: dict[int, int] = {}
    private = sum(_process_bytes(pid, memfds) for pid in pids)
    return private + sum(memfds.values())


def sample_nodes(orchestrator_pid: int) -> None:
    """The sampler process: each node's idle figure, READY, samples until stdin closes, then its peak over idle.

    A process of its own, so that reading /proc shares no GIL with the coordinator being measured.
    Each node's processes are listed once (its workers are up and stay up through the rounds).
    """
    nodes = {pid: [pid, *descendants(pid)] for pid in descendants(orchestrator_pid) if _is_runner(pid)}
    idle = {runner: node_bytes(pids) for runner, pids in nodes.items()}
    peak = dict(idle)
    print("READY", flush=True)
    while not select.select([sys.stdin], [], [], 0.001)[0]:
        for runner, pids in nodes.items():
            peak[runner] = max(peak[runner], node_bytes(pids))
    print(json.dumps({runner: peak[runner] - idle[runner] for runner in nodes}))


async def node_extra_bytes(orchestrator_pid: int, client, arguments: list, payload: Payload, n: int) -> int:
    """The largest node's extra memory over MEMORY_ROUNDS untimed rounds of `payload`."""
    sampler = subprocess.Popen([sys.executable, __file__, "--sample-nodes-of", str(orchestrator_pid)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        if (await asyncio.to_thread(sampler.stdout.readline)).strip() != "READY":
            raise RuntimeError("the memory sampler did not start")
        for _ in range(MEMORY_ROUNDS):
            await _checked_round(client, arguments, payload, n)
        extra, _ = await asyncio.to_thread(sampler.communicate, "", 60)
        return max(json.loads(extra).values())
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait()


def _is_runner(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return b"\0runner\0" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


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
            for _ in range(warmup_rounds(payload)):
                await _checked_round(client, arguments, payload, n)
            for _ in range(payload.rounds):
                cpu_before, started = time.process_time(), time.perf_counter()
                await _checked_round(client, arguments, payload, n)
                samples.append(time.perf_counter() - started)
                cpu += time.process_time() - cpu_before
            cells[payload.name] = cell(samples, cpu, payload.rounds * n)
            if payload.name.endswith("16M"):
                cells[payload.name]["node_extra_bytes"] = await node_extra_bytes(orchestrator.pid, client, arguments, payload, n)
        return cells
    finally:
        if client is not None:
            await client.close()
        orchestrator.terminate()
        orchestrator.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


async def _checked_round(client, arguments: list, payload: Payload, n: int) -> None:
    results = await client.call("echo", arguments)
    wrong = [(r.model_id, r.reason, r.message) for r in results.values()
             if r.status is not CallStatus.SUCCESS or r.output["n"] != payload.count]  # fmt: skip
    assert len(results) == n and not wrong, (payload.name, wrong[:3])


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
    parser.add_argument("--sample-nodes-of", type=int, help=argparse.SUPPRESS)  # the memory sampler's own process
    args = parser.parse_args()
    if args.sample_nodes_of:
        sample_nodes(args.sample_nodes_of)
        return
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
    for payload in payloads:
        extra = ours[payload.name].get("node_extra_bytes")
        if extra is not None:
            size = len(encode_data(VariantType.Value(payload.type_name), payload.value))
            print(f"{payload.name}: largest node's extra memory during the rounds {extra / 2**20:.1f} MiB"
                  f" = {extra / size:.2f}x the payload (target <= 2x)")


if __name__ == "__main__":
    main()
