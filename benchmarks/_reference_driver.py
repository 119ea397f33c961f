"""Runs INSIDE the reference client venv (benchmarks/.reference-venv/client); started by
benchmarks/reference_harness.py, never imported by our code.

Two roles:

``orchestrator``  a minimal fake Model Orchestrator: a WebSocket server on 127.0.0.1 that
    serves ``ws://127.0.0.1:<port>/<crunch_id>``. Once every runner port accepts TCP
    connections it sends the reference client's expected first message::

        {"event": "init", "data": [{"deployment_id": ..., "model_id": ..., "state": "RUNNING",
                                    "ip": "127.0.0.1", "port": ..., "infos": {"model_name": ...,
                                    "cruncher_id": ..., "cruncher_name": ...}}, ...]}

    then only listens; any message the client sends (``report_failure``) is written to stderr
    as a ``REPORT <json>`` line and otherwise ignored (models are never stopped).

``client``  the coordinator: drives ``model_runner_client`` exactly as its README shows
    (``DynamicSubclassModelConcurrentRunner(...)``, ``await init()``, ``sync()`` in the
    background, ``await call(method_name=..., arguments=([Argument(...)], []))``).

Protocol with the harness (stdout lines prefixed ``@@REF``, JSON bodies):
    READY {...}   first successful full fan-out done (monotonic timestamp)
    WARM  {...}   warm-up rounds done; the driver then blocks reading ``GO`` on stdin
    DONE  {...}   measured rounds done: samples, own CPU, status counts
    ERROR {...}   fatal problem (the harness raises)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

PREFIX = "@@REF"


def emit(kind: str, body: dict) -> None:
    sys.stdout.write(f"{PREFIX} {kind} {json.dumps(body)}\n")
    sys.stdout.flush()


# -- fake orchestrator ---------------------------------------------------------------------


async def _port_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


async def _wait_ports(host: str, ports: list[int]) -> None:
    pending = list(ports)
    while pending:
        results = await asyncio.gather(*(_port_open(host, p) for p in pending))
        pending = [p for p, ok in zip(pending, results) if not ok]
        if pending:
            await asyncio.sleep(0.05)


async def orchestrator_main(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import serve

    with open(args.models) as f:
        models = json.load(f)
    host = "127.0.0.1"
    runners_listening = asyncio.create_task(_wait_ports(host, [m["port"] for m in models]))
    init_message = json.dumps({
        "event": "init",
        "data": [
            {
                "deployment_id": f"deployment-{m['model_id']}",
                "model_id": m["model_id"],
                "state": "RUNNING",
                "ip": host,
                "port": m["port"],
                "infos": {
                    "model_name": f"echo-{m['model_id']}",
                    "cruncher_id": f"cruncher-{m['model_id']}",
                    "cruncher_name": f"cruncher {m['model_id']}",
                },
            }
            for m in models
        ],
    })

    async def handler(connection) -> None:
        if connection.request.path.strip("/") != args.crunch_id:
            await connection.close(code=4004, reason="unknown crunch")
            return
        await runners_listening
        print(f"ANNOUNCED {len(models)} models at {time.monotonic():.6f}", file=sys.stderr, flush=True)
        await connection.send(init_message)
        async for message in connection:
            print(f"REPORT {message}", file=sys.stderr, flush=True)

    async with serve(handler, host, 0) as server:
        port = server.sockets[0].getsockname()[1]
        sys.stdout.write(f"{PREFIX} LISTENING {json.dumps({'port': port})}\n")
        sys.stdout.flush()
        await asyncio.Future()  # until the harness terminates us


# -- coordinator (reference client) ----------------------------------------------------------


async def client_main(args: argparse.Namespace) -> None:
    from model_runner_client.grpc.generated.commons_pb2 import Argument, Variant, VariantType
    from model_runner_client.model_concurrent_runners import DynamicSubclassModelConcurrentRunner
    from model_runner_client.model_concurrent_runners.model_concurrent_runner import ModelPredictResult
    from model_runner_client.utils.datatype_transformer import encode_data

    with open(args.payload) as f:
        payload = json.load(f)
    n = args.n_models
    success = ModelPredictResult.Status.SUCCESS

    concurrent_runner = DynamicSubclassModelConcurrentRunner(
        timeout=args.timeout,
        crunch_id=args.crunch_id,
        host=args.host,
        port=args.port,
        base_classname=args.base_classname,
    )
    await concurrent_runner.init()  # returns once every announced model's Setup succeeded or failed
    connected = len(concurrent_runner.model_cluster.models_run)
    if connected < n:  # the fake orchestrator never re-announces, so they would never come back
        emit("ERROR", {"stage": "init", "connected_models": connected, "announced": n})
        return
    sync_task = asyncio.create_task(concurrent_runner.sync())

    # Same payload every round: encode it once, as a coordinator sending one tick to all models.
    arguments = (
        [Argument(position=1, data=Variant(type=VariantType.JSON, value=encode_data(VariantType.JSON, payload)))],
        [],
    )

    def successes(results) -> int:
        return sum(1 for r in results.values() if r.status == success)

    # 1. first successful full fan-out (all N models answered SUCCESS)
    deadline = time.monotonic() + args.ready_timeout
    attempts = 0
    while True:
        attempts += 1
        results = await concurrent_runner.call(method_name="echo", arguments=arguments)
        if len(results) == n and successes(results) == n:
            break
        if time.monotonic() > deadline:
            emit("ERROR", {
                "stage": "ready",
                "connected_models": len(concurrent_runner.model_cluster.models_run),
                "results": len(results), "successes": successes(results),
                "details": sorted({str(r.detail) for r in results.values() if r.status != success})[:5],
            })
            return
        await asyncio.sleep(0.1)
    emit("READY", {"t_ready": time.monotonic(), "attempts": attempts,
                   "connected_models": len(concurrent_runner.model_cluster.models_run)})

    # 2. warm-up (excluded from every figure)
    warm_bad = 0
    for _ in range(args.warmup):
        results = await concurrent_runner.call(method_name="echo", arguments=arguments)
        warm_bad += n - successes(results)
    emit("WARM", {"bad_results": warm_bad})
    if sys.stdin.readline().strip() != "GO":
        return

    # 3. measured rounds (back to back unless --interval)
    samples: list[float] = []
    bad_results = 0
    perf = time.perf_counter
    cpu0 = time.process_time()
    for i in range(args.rounds):
        if args.interval > 0 and i:
            await asyncio.sleep(args.interval)  # idle gap between ticks (not in the round time)
        started = perf()
        results = await concurrent_runner.call(method_name="echo", arguments=arguments)
        samples.append(perf() - started)
        bad_results += n - successes(results)
    cpu1 = time.process_time()

    # output fidelity, checked outside the timed loop on the last round
    echoed_ok = len(results) == n and all(r.result == payload for r in results.values())
    emit("DONE", {
        "samples_s": samples,
        "cpu_s": cpu1 - cpu0,
        "bad_results": bad_results,
        "echoed_ok": echoed_ok,
        "connected_models": len(concurrent_runner.model_cluster.models_run),
    })

    sync_task.cancel()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(m.close() for m in list(concurrent_runner.model_cluster.models_run.values()))),
            timeout=5,
        )
    except Exception:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    orch = sub.add_parser("orchestrator")
    orch.add_argument("--models", required=True, help="JSON file: [{model_id, port}, ...]")
    orch.add_argument("--crunch-id", required=True)
    cli = sub.add_parser("client")
    cli.add_argument("--host", default="127.0.0.1")
    cli.add_argument("--port", type=int, required=True)
    cli.add_argument("--crunch-id", required=True)
    cli.add_argument("--base-classname", required=True)
    cli.add_argument("--n-models", type=int, required=True)
    cli.add_argument("--rounds", type=int, required=True)
    cli.add_argument("--warmup", type=int, required=True)
    cli.add_argument("--timeout", type=int, default=30)
    cli.add_argument("--ready-timeout", type=float, default=300.0)
    cli.add_argument("--interval", type=float, default=0.0, help="idle seconds between measured rounds")
    cli.add_argument("--payload", required=True, help="JSON file holding the payload list")
    args = parser.parse_args()
    try:
        if args.role == "orchestrator":
            asyncio.run(orchestrator_main(args))
        else:
            asyncio.run(client_main(args))
    except Exception as exc:  # report, then exit without the library's atexit hooks
        emit("ERROR", {"stage": args.role, "error": f"{type(exc).__name__}: {exc}"})
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # The reference WebsocketClient registers an atexit hook that reruns an event loop; skip it.
    os._exit(0)


if __name__ == "__main__":
    main()
