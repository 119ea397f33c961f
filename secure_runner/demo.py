"""`secure-runner demo`: the whole system end to end, on loopback, in one command.

It makes a throw-away PKI, starts the embedded orchestrator over the example
submissions (at most one runner process per CPU core, a worker subprocess per model),
then acts as a coordinator: a few rounds of `tick` and `predict` fanned out to
every model, printing each model's status, latency and identity per call.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

from secure_runner import pki
from secure_runner.client.concurrent_runner import DynamicSubclassModelConcurrentRunner
from secure_runner.client.results import CallResult, ModelIdentity
from secure_runner.client.security import CoordinatorSecurity
from secure_runner.codec import encode_data
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.orchestrator.local import LocalOrchestrator, LocalOrchestratorSettings, StartProgress
from secure_runner.runner.sandbox.policy import SandboxPolicy, WorkerLimits
from secure_runner.runner.supervisor import check_sandbox
from secure_runner.v1.values_pb2 import Argument, Variant, VariantType

CRUNCH_ID = "demo-crunch"
BASE_CLASS = "demo_game.tracker.TrackerBase"
READY_WAIT_SECONDS = 5.0
MODELS = [
    pki.ModelSpec("good-model", "Moving average", "alice", "Alice"),
    pki.ModelSpec("slow-model", "Sleepy", "bob", "Bob"),
    pki.ModelSpec("raising-model", "Buggy", "carol", "Carol"),
]


async def _missing_sandbox_layers() -> tuple[str, ...]:
    """Probe the worker sandbox here; the demo runs without missing layers, and says so loudly."""
    layers = await check_sandbox(WorkerLimits(), SandboxPolicy())
    missing = tuple(layer.name for layer in layers if not layer.active)
    if missing:
        print(
            f"WARNING: sandbox layers missing on this machine: {', '.join(missing)} "
            "(see `secure-runner sandbox-check`). The demo runs without them; a runner refuses "
            "to start without them unless given --allow-missing-layer."
        )
    else:
        print(f"sandbox: all {len(layers)} worker layers active ({', '.join(layer.name for layer in layers)})")
    return missing


def default_examples() -> Path:
    return Path(__file__).resolve().parent.parent / "examples"


def format_table(title: str, results: dict[ModelIdentity, CallResult]) -> str:
    header = f"{'model':<14} {'cruncher':<8} {'deployment':<22} {'status':<8} {'latency':>10}  output / reason"
    lines = [f"== {title}", header, "-" * len(header)]
    for result in sorted(results.values(), key=lambda r: r.model.model_id):
        detail = repr(result.output) if result.status == "SUCCESS" else f"{result.reason}: {result.message}"
        lines.append(
            f"{result.model.model_id:<14} {result.model.cruncher_name:<8} {result.model.deployment_id:<22} "
            f"{result.status:<8} {result.latency_us / 1000:>8.1f}ms  {detail[:70]}"
        )
    return "\n".join(lines)


def print_progress(progress: StartProgress) -> None:
    """`started k of N`, naming the node's models; a failed runner named with its reason."""
    what = f"{progress.node_id} ({', '.join(progress.model_ids)})"
    if progress.up:
        print(f"orchestrator: started {progress.started} of {progress.total} runners: {what}", flush=True)
    else:
        print(f"orchestrator: runner {progress.started} of {progress.total} FAILED: {what}: "
              f"{progress.failed.get(progress.node_id, 'not started')[:200]}", flush=True)


def _json_argument(value) -> list[Argument]:
    return [Argument(position=1, data=Variant(type=VariantType.JSON, value=encode_data(VariantType.JSON, value)))]


async def run_demo(rounds: int = 3, examples: Path | None = None, timeout: float = 1.0) -> int:
    examples = examples or default_examples()
    if not (examples / "submissions").is_dir():
        raise ConfigError(ErrorCode.INVALID_VALUE, f"no examples at {examples}; pass --examples DIR")
    missing = await _missing_sandbox_layers()
    with tempfile.TemporaryDirectory(prefix="secure-runner-demo-") as tmp:
        layout = pki.make_test_pki(Path(tmp) / "pki", CRUNCH_ID, MODELS, days=1)
        print(f"PKI: CA, certificates and identity keys for crunch {CRUNCH_ID!r} in {layout.root}")
        orchestrator = LocalOrchestrator(
            LocalOrchestratorSettings(
                crunch_id=CRUNCH_ID,
                submissions=examples / "submissions",
                pki_dir=layout.root,
                base_paths=[examples],
                runner_log_level="ERROR",
                allow_missing_layers=missing,
                stop_models_on_exit=True,  # the demo leaves no runner behind
            ),
            progress=print_progress,
        )
        print(f"orchestrator: starting the runners of {len(MODELS)} models")
        port = await orchestrator.start()
        print(f"orchestrator: mTLS on 127.0.0.1:{port}")
        runner = DynamicSubclassModelConcurrentRunner(
            timeout=timeout,
            crunch_id=CRUNCH_ID,
            host="127.0.0.1",
            port=port,
            base_classname=BASE_CLASS,
            max_consecutive_failures=10,
            max_consecutive_timeouts=3,
            security=CoordinatorSecurity.from_pki_dir(layout.root),
        )
        sync = None
        try:
            await runner.init()
            sync = asyncio.create_task(runner.sync())
            print(f"coordinator: connected to {len(runner.models)} models; timeout {timeout} s per call\n")
            rng = random.Random(7)
            price = 100.0
            for round_no in range(1, rounds + 1):
                prices = [price := round(price + rng.gauss(0, 1), 2) for _ in range(5)]
                # A model whose worker was just restarted (after a timeout) would be skipped as
                # COOLING_DOWN; the demo waits for it instead, so every call reaches every model.
                await runner.ready(READY_WAIT_SECONDS)
                tick = await runner.call("tick", _json_argument(prices))
                print(format_table(f"round {round_no}: tick({prices})", tick))
                horizon = [Argument(position=1, data=Variant(type=VariantType.INT, value=encode_data(VariantType.INT, 3)))]
                await runner.ready(READY_WAIT_SECONDS)
                print(format_table(f"round {round_no}: predict(3)", await runner.call("predict", horizon)))
                print(f"still connected: {', '.join(sorted(m.model_id for m in runner.models))}\n")
        finally:
            if sync is not None:
                sync.cancel()
                await asyncio.gather(sync, return_exceptions=True)
            await runner.close()
            await orchestrator.stop()
    print("demo finished: everything shut down")
    return 0
