"""Fan-out speed: this project (full security and sandbox) against raw gRPC and the reference.

Usage: python benchmarks/fanout.py [--models 1,10,50,100] [--rounds 100]

Not a test: it prints figures for this machine. For each N it runs, in one process, the same
fan-out of `echo(prices)` (100 floats, JSON) to N trivial models, back to back:
  (a)  raw grpc.aio echo: one server process per model, no TLS, no token, no worker;
  (b)  this project as shipped: mTLS, signed tokens, audit, a sandboxed worker per model, models
       packed by the orchestrator's default (one runner process per core, here ceil(N/2) models
       each), one FanOut per node;
  (b1) the same with one model per runner;
  (c)  the reference (PyPI crunch-model-runner + model-runner-client, no security), installed
       by benchmarks/reference_harness.py into its own venvs and driven the same way.
Per configuration: p50 / p99 round time, rounds per second, coordinator CPU per model call,
server CPU per model call (every server-side process: runners and their workers), memory per
model (worker RSS) and per runner or node, and the time until all N models answer. Then the
ratios b/a, b1/c and b/c. Noise: each configuration runs in two halves; the spread of the two
half medians is printed beside each p50.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from nacl.signing import SigningKey, VerifyKey

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import reference_harness  # noqa: E402
from procstat import cpu_seconds, descendants, p99, rss_mb  # noqa: E402

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
from secure_runner.smp.identity import PeerIdentity  # noqa: E402

CRUNCH = "fanout-bench"
BASE = BENCH / "reference_model" / "base"
SUBMISSION = BENCH / "reference_model" / "submission"
BASE_CLASS = "refbench.base.EchoBase"
PAYLOAD = reference_harness.default_payload()
ECHO_RPC = "/bench.Echo/Echo"


def summarize(times: list[float], calls: int, client_cpu: float, server_cpu: float) -> dict:
    half = len(times) // 2
    return {
        "p50_ms": statistics.median(times) * 1e3,
        "p99_ms": p99(times) * 1e3,
        "rounds_per_s": len(times) / sum(times),
        "client_cpu_us": client_cpu / calls * 1e6,
        "server_cpu_us": server_cpu / calls * 1e6,
        "halves_ms": (statistics.median(times[:half]) * 1e3, statistics.median(times[half:]) * 1e3),
    }


# -- (a) raw grpc.aio echo, and the layers benchmarks/isolation_floor.py adds to it ----------

# Each layer adds one cost to the ones before it; (a) is the first alone.
RAW_LAYERS = ("echo", "mtls", "process", "verify")
SIGNED_KEY = "x-signed-bin"  # "verify": the client's Ed25519-signed message, checked per call


def _raw_child_main() -> None:
    """The "process" layer's child: echoes length-prefixed frames from stdin to stdout."""
    def read_exactly(size: int) -> bytes:
        data = b""
        while len(data) < size and (chunk := os.read(0, size - len(data))):
            data += chunk
        return data

    while len(head := read_exactly(4)) == 4:
        os.write(1, head + read_exactly(int.from_bytes(head, "big")))


class _ChildEcho:
    """The reply comes from a child process over a pipe (the worker hop, without a sandbox)."""

    def __init__(self) -> None:
        self._child = subprocess.Popen(
            [sys.executable, __file__, "--echo-child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self._waiting: list[asyncio.Future] = []
        self._buffer = bytearray()
        os.set_blocking(self._child.stdout.fileno(), False)
        asyncio.get_running_loop().add_reader(self._child.stdout.fileno(), self._readable)

    def _readable(self) -> None:
        self._buffer += os.read(self._child.stdout.fileno(), 1 << 20)
        while len(self._buffer) >= 4 and len(self._buffer) >= 4 + (size := int.from_bytes(self._buffer[:4], "big")):
            self._waiting.pop(0).set_result(bytes(self._buffer[4:4 + size]))
            del self._buffer[:4 + size]

    async def __call__(self, request: bytes) -> bytes:
        reply = asyncio.get_running_loop().create_future()
        self._waiting.append(reply)
        os.write(self._child.stdin.fileno(), len(request).to_bytes(4, "big") + request)
        return await reply


def echo_server_main(port_file: str, layers: int, pki_root: str) -> None:
    async def serve() -> None:
        reply = _ChildEcho() if layers > RAW_LAYERS.index("process") else None
        verify_key = None
        if layers > RAW_LAYERS.index("verify"):
            verify_key = VerifyKey(Path(pki_root, "floor-verify.key").read_bytes())

        async def echo(request: bytes, context) -> bytes:
            if verify_key is not None:
                signed = dict(context.invocation_metadata())[SIGNED_KEY]
                verify_key.verify(signed)  # raises on a bad signature: the call fails
            return await reply(request) if reply else request

        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})])
        if layers > RAW_LAYERS.index("mtls"):
            layout = pki.PkiLayout(Path(pki_root))
            credentials = grpc.ssl_server_credentials(
                [(layout.runner_key(RAW_SERVER).read_bytes(), layout.runner_cert(RAW_SERVER).read_bytes())],
                root_certificates=layout.ca_cert.read_bytes(), require_client_auth=True,
            )
            port = server.add_secure_port("127.0.0.1:0", credentials)
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(serve())


RAW_SERVER = "m0000"  # every layered server presents this test identity


async def run_raw(n: int, rounds: int, tmp: Path, layers: int = 1) -> dict:
    """N one-model echo servers with the first `layers` of RAW_LAYERS, driven like (b) and (c)."""
    folder = Path(tempfile.mkdtemp(dir=tmp))  # fresh port files for every run
    layout = pki.make_test_pki(folder / "pki", CRUNCH, [pki.ModelSpec(RAW_SERVER)])
    signing_key = SigningKey.generate() if layers > RAW_LAYERS.index("verify") else None
    if signing_key is not None:
        (layout.root / "floor-verify.key").write_bytes(bytes(signing_key.verify_key))
    started = time.perf_counter()
    procs, ports = [], []
    for i in range(n):
        port_file = folder / f"echo-{i}.port"
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--echo-server", str(port_file), str(layers), str(layout.root)]
        ))
        ports.append(port_file)
    try:
        for i, port_file in enumerate(ports):
            while not port_file.exists() or not port_file.read_text():
                await asyncio.sleep(0.02)
            ports[i] = int(port_file.read_text())
        if layers > RAW_LAYERS.index("mtls"):
            credentials = grpc.ssl_channel_credentials(
                layout.ca_cert.read_bytes(), layout.coordinator_key.read_bytes(), layout.coordinator_cert.read_bytes()
            )
            server_name = PeerIdentity.make(CRUNCH, "runner", RAW_SERVER).tls_server_name
            channels = [
                grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", server_name)])
                for port in ports
            ]
        else:
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        calls = [channel.unary_unary(ECHO_RPC) for channel in channels]
        body = encode_data(VariantType.JSON, PAYLOAD)
        rounds_done = 0

        async def one_round(first: bool = False) -> None:
            nonlocal rounds_done
            metadata = None
            if signing_key is not None:  # one signature per round, as our client signs once per fan-out
                rounds_done += 1
                signed = signing_key.sign(rounds_done.to_bytes(8, "big") + hashlib.sha256(body).digest())
                metadata = ((SIGNED_KEY, bytes(signed)),)
            replies = await asyncio.gather(
                *(call(body, timeout=120 if first else 30, metadata=metadata, wait_for_ready=first) for call in calls)
            )
            assert all(reply == body for reply in replies)

        await one_round(first=True)
        ready = time.perf_counter() - started
        servers = [p.pid for p in procs]
        result = await _measure(one_round, rounds, n, servers + [c for p in servers for c in descendants(p)])
        result.update(ready_s=ready, runner_rss_mb=statistics.median(rss_mb(p.pid) for p in procs))
        for channel in channels:
            await channel.close()
        return result
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def _measure(one_round, rounds: int, n: int, server_pids: list[int]) -> dict:
    for _ in range(max(5, rounds // 10)):  # warm-up
        await one_round()
    server_cpu, client_cpu, times = cpu_seconds(server_pids), time.process_time(), []
    for _ in range(rounds):
        started = time.perf_counter()
        await one_round()
        times.append(time.perf_counter() - started)
    return summarize(
        times, rounds * n, time.process_time() - client_cpu, cpu_seconds(server_pids) - server_cpu
    )


# -- (b), (b1) this project ------------------------------------------------------------------


async def run_ours(n: int, rounds: int, tmp: Path, models_per_node: int | None) -> dict:
    """This project's orchestrator and client; `models_per_node` None: the orchestrator's default."""
    folder = Path(tempfile.mkdtemp(dir=tmp))
    model_ids = [f"m{i:04d}" for i in range(n)]
    layout = pki.make_test_pki(folder / "pki", CRUNCH, [pki.ModelSpec(m, m, "alice", "Alice") for m in model_ids])
    submissions = folder / "submissions"
    submissions.mkdir()
    for model_id in model_ids:
        (submissions / model_id).symlink_to(SUBMISSION)
    command = [
        sys.executable, "-m", "secure_runner.cli", "orchestrator", "--crunch", CRUNCH,
        "--submissions", str(submissions), "--pki", str(layout.root), "--base-path", str(BASE),
        "--log-level", "ERROR", "--port", "0", "--stop-models-on-exit",
    ]
    if models_per_node is not None:
        command += ["--models-per-node", str(models_per_node)]
    started = time.perf_counter()
    orchestrator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    client = None
    try:
        port = int(orchestrator.stdout.readline().split()[1])
        client = DynamicSubclassModelConcurrentRunner(
            timeout=30, crunch_id=CRUNCH, host="127.0.0.1", port=port, base_classname=BASE_CLASS,
            security=CoordinatorSecurity.from_pki_dir(layout.root), connect_timeout=120,
        )
        await client.init()
        arguments = [Argument(position=1, data=Variant(type=VariantType.JSON, value=encode_data(VariantType.JSON, PAYLOAD)))]

        async def one_round() -> None:
            results = await client.call("echo", arguments)
            assert len(results) == n and all(r.status is CallStatus.SUCCESS for r in results.values()), [
                (r.model_id, r.reason, r.message) for r in results.values() if r.status is not CallStatus.SUCCESS
            ][:3]

        await one_round()
        ready = time.perf_counter() - started
        servers = descendants(orchestrator.pid)
        result = await _measure(one_round, rounds, n, servers)
        runners = [pid for pid in servers if "runner" in _cmdline(pid) and "worker" not in _cmdline(pid)]
        workers = [pid for pid in servers if "secure_runner.runner.worker" in _cmdline(pid)]
        result.update(
            ready_s=ready,
            runner_rss_mb=statistics.median(rss_mb(pid) for pid in runners),
            worker_rss_mb=statistics.median(rss_mb(pid) for pid in workers),
            nodes=len(runners),
        )
        return result
    finally:
        if client is not None:
            await client.close()
        orchestrator.terminate()
        orchestrator.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# -- report ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1,10,50,100")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--echo-server", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--echo-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        port_file, layers, pki_root = args.echo_server
        echo_server_main(port_file, int(layers), pki_root)
        return
    if args.echo_child:
        _raw_child_main()
        return
    reference_harness.ensure_reference_venv()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for n in (int(x) for x in args.models.split(",")):
            rounds = max(20, args.rounds if n <= 10 else args.rounds // (2 if n <= 50 else 4))
            results = {
                "a": asyncio.run(run_raw(n, rounds, tmp)),
                "b": asyncio.run(run_ours(n, rounds, tmp, None)),
                "b1": asyncio.run(run_ours(n, rounds, tmp, 1)),
            }
            reference = reference_harness.run_reference(n, rounds, PAYLOAD)
            half = len(reference["samples_ms"]) // 2
            results["c"] = {
                "p50_ms": reference["p50_ms"],
                "p99_ms": reference["p99_ms"],
                "rounds_per_s": reference["rounds_per_s"],
                "client_cpu_us": reference["client_cpu_us_per_call"],
                "server_cpu_us": reference["runner_cpu_us_per_call"],
                "runner_rss_mb": reference["runner_rss_mb"],
                "ready_s": reference["ready_s"],
                "halves_ms": (statistics.median(reference["samples_ms"][:half]),
                              statistics.median(reference["samples_ms"][half:])),
            }
            rows.append((n, rounds, results))
            _print_block(n, rounds, results)
    print("\nratios of p50 round time (lower is better for this project):")
    print(f"{'N':>4} {'b/a':>6} {'b1/c':>6} {'b/c':>6}   coordinator CPU b/c")
    for n, _, r in rows:
        print(
            f"{n:>4} {r['b']['p50_ms'] / r['a']['p50_ms']:>6.2f} {r['b1']['p50_ms'] / r['c']['p50_ms']:>6.2f}"
            f" {r['b']['p50_ms'] / r['c']['p50_ms']:>6.2f}   {r['b']['client_cpu_us'] / r['c']['client_cpu_us']:.2f}"
        )


def _print_block(n: int, rounds: int, results: dict) -> None:
    names = {"a": "a  raw grpc", "b": "b  ours packed", "b1": "b1 ours 1/node", "c": "c  reference"}
    print(f"\nN = {n} models, {rounds} rounds per configuration")
    print(f"{'config':<15} {'p50 ms':>8} {'(halves)':>15} {'p99 ms':>8} {'rounds/s':>9} {'coord CPU':>10}"
          f" {'server CPU':>11} {'worker MB':>10} {'runner MB':>10} {'ready s':>8}")
    for key, r in results.items():
        halves = "{:.2f}/{:.2f}".format(*r["halves_ms"])
        worker = f"{r['worker_rss_mb']:.0f}" if "worker_rss_mb" in r else "-"
        runner = f"{r['runner_rss_mb']:.0f}" + (f" x{r['nodes']}" if "nodes" in r else "")
        print(
            f"{names[key]:<15} {r['p50_ms']:>8.2f} {halves:>15} {r['p99_ms']:>8.2f} {r['rounds_per_s']:>9.1f}"
            f" {r['client_cpu_us']:>7.0f} us {r['server_cpu_us']:>8.0f} us {worker:>10} {runner:>10} {r['ready_s']:>8.2f}"
        )


if __name__ == "__main__":
    main()
