"""The floor under (b1): what one model per server process costs before this project's own code.

Usage: python benchmarks/isolation_floor.py [--models 50] [--rounds 50]

Not a test. For N one-model servers it runs, in one process, raw grpc.aio echo servers that
add one cost at a time (benchmarks/fanout.py, RAW_LAYERS), then the reference (c):
  echo     no TLS; the reply is the request (fanout.py's configuration (a));
  mtls     the same behind mutual TLS, with certificates from this project's test PKI;
  process  the reply comes from a child process over a pipe: the worker hop, without a sandbox;
  verify   the server also checks one Ed25519 signature (PyNaCl) per call, as any per-call
           token check must (the client signs once per round, as ours signs once per fan-out).
The last layer is a floor for fanout.py's (b1): what (b1) does beyond it (token parsing and
claims, replay cache, audit line, request validation, the sandbox, the worker's codec and
supervision) can only add to it. A floor at or above the reference means b1/c <= 1.0 cannot be
reached by making that code cheaper.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import fanout
import reference_harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    reference_harness.ensure_reference_venv()
    rows = []
    with tempfile.TemporaryDirectory(prefix="isolation-floor-") as tmp:
        for layers, name in enumerate(fanout.RAW_LAYERS, start=1):
            r = asyncio.run(fanout.run_raw(args.models, args.rounds, Path(tmp), layers))
            rows.append(("+ " * (layers > 1) + name, r["p50_ms"], r["server_cpu_us"], r["client_cpu_us"]))
    reference = reference_harness.run_reference(args.models, args.rounds, fanout.PAYLOAD)
    rows.append(("reference (c)", reference["p50_ms"], reference["runner_cpu_us_per_call"],
                 reference["client_cpu_us_per_call"]))
    print(f"\nN = {args.models} one-model servers, {args.rounds} rounds each")
    print(f"{'servers':<16} {'p50 ms':>8} {'/ c':>6} {'server CPU':>11} {'coord CPU':>10}  (per model call)")
    for name, p50, server, client in rows:
        print(f"{name:<16} {p50:>8.2f} {p50 / reference['p50_ms']:>6.2f} {server:>8.0f} us {client:>7.0f} us")


if __name__ == "__main__":
    main()
