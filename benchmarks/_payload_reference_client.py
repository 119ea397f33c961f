"""The reference coordinator for benchmarks/payload.py (runs in the reference client venv).

PyPI `model-runner-client`'s DynamicSubclassModelConcurrentRunner, driven as its README shows,
sends each payload's bytes (encoded once before its rounds by benchmarks/payload.py exactly as the
reference's `encode_data` writes them: pyarrow's Parquet writer, `json.dumps`) to every model and
times the rounds. Prints `@@REF READY`, one `@@REF CELL {...}` per payload and `@@REF DONE`, or
`@@REF ERROR {...}`; the models come from benchmarks/_reference_driver.py's fake orchestrator.
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


async def client_main(args: argparse.Namespace) -> None:
    from model_runner_client.grpc.generated.commons_pb2 import Argument, Variant, VariantType
    from model_runner_client.model_concurrent_runners import DynamicSubclassModelConcurrentRunner
    from model_runner_client.model_concurrent_runners.model_concurrent_runner import ModelPredictResult

    success = ModelPredictResult.Status.SUCCESS
    runner = DynamicSubclassModelConcurrentRunner(
        timeout=args.timeout, crunch_id=args.crunch_id, host="127.0.0.1", port=args.port,
        base_classname=args.base_classname,
    )
    await runner.init()
    if len(runner.model_cluster.models_run) < args.n_models:
        emit("ERROR", {"stage": "init", "connected_models": len(runner.model_cluster.models_run)})
        return
    sync_task = asyncio.create_task(runner.sync())
    emit("READY", {})
    with open(args.payloads) as file:
        payloads = json.load(file)
    for payload in payloads:
        with open(payload["file"], "rb") as file:
            value = file.read()
        arguments = ([Argument(position=1, data=Variant(type=VariantType.Value(payload["type"]), value=value))], [])
        bad, samples = 0, []
        for round_number in range(payload["warmup"] + payload["rounds"]):
            if round_number == payload["warmup"]:
                cpu = time.process_time()
            started = time.perf_counter()
            results = await runner.call(method_name="echo", arguments=arguments)
            if round_number >= payload["warmup"]:
                samples.append(time.perf_counter() - started)
            bad += sum(1 for r in results.values() if r.status != success or r.result["n"] != payload["n"])
        emit("CELL", {"name": payload["name"], "samples_s": samples, "cpu_s": time.process_time() - cpu, "bad": bad})
    emit("DONE", {})
    sync_task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--crunch-id", required=True)
    parser.add_argument("--base-classname", required=True)
    parser.add_argument("--n-models", type=int, required=True)
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("--payloads", required=True, help="JSON file: [{name, type, file, n, rounds, warmup}]")
    args = parser.parse_args()
    try:
        asyncio.run(client_main(args))
    except Exception as exc:
        emit("ERROR", {"stage": "client", "error": f"{type(exc).__name__}: {exc}"})
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # skip the reference WebsocketClient's atexit hook (as _reference_driver.py does)


if __name__ == "__main__":
    main()
