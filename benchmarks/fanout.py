"""Fan-out speed: this project (full security and sandbox) against raw gRPC and the reference.

Usage: python benchmarks/fanout.py [--models 1,10,50,100] [--rounds 100] [--metrics]

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

`--metrics` (e.g. `--models 50 --rounds 1000 --metrics`) measures what observing costs instead:
two packed crunches (b) up at once, every metric off in one and on in the other (orchestrator and
runners serving /metrics, the coordinator's ClientMetrics mounted), taking turns round by round so
a shared machine's load falls on both alike; done twice, metrics on in the crunch started second
then first (start order alone moves figures a few percent). It prints all four and the on/off
ratios of p50, coordinator and server CPU (and the median ratio of neighbouring on and off
rounds), with a noise gauge: off rounds run just before an on round against those just after one.
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
from secure_runner.client.metrics import ClientMetrics  # noqa: E402
from secure_runner.smp.identity import PeerIdentity  # noqa: E402
import grpc  # noqa: E402  after secure_runner, which sets grpc's TLS suites before grpc loads (T-1)

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


def orchestrator_crunch(n: int, tmp: Path, submission: Path = SUBMISSION, crunch: str = CRUNCH):
    """A folder (delete it after) with a test PKI for N models m0000.. all running `submission`, and the
    orchestrator command serving them."""
    folder = Path(tempfile.mkdtemp(dir=tmp))
    model_ids = [f"m{i:04d}" for i in range(n)]
    layout = pki.make_test_pki(folder / "pki", crunch, [pki.ModelSpec(m, m, "alice", "Alice") for m in model_ids])
    submissions = folder / "submissions"
    submissions.mkdir()
    for model_id in model_ids:
        (submissions / model_id).symlink_to(submission)
    command = [
        sys.executable, "-m", "secure_runner.cli", "orchestrator", "--crunch", crunch,
        "--submissions", str(submissions), "--pki", str(layout.root), "--base-path", str(BASE),
        "--log-level", "ERROR", "--port", "0", "--stop-models-on-exit",
    ]
    return folder, layout, command


async def run_ours(
    n: int, rounds: int, tmp: Path, models_per_node: int | None,
    submission: Path = SUBMISSION, results_seen: list | None = None, metrics: bool = False, measure=None,
) -> dict:
    """This project's orchestrator and client; `models_per_node` None: the orchestrator's default.

    `submission`: the model every one of the N runs (an `echo(prices)` returning `prices`).
    `results_seen`: if given, every round's results are appended to it (the last `rounds`
    entries are the measured rounds).
    `metrics`: every metric on (orchestrator and runners serving /metrics, the client's helper mounted).
    `measure`: what to do once every model answers, `_measure`'s signature (default `_measure`).
    """
    folder, layout, command = orchestrator_crunch(n, tmp, submission)
    if models_per_node is not None:
        command += ["--models-per-node", str(models_per_node)]
    client_metrics = ClientMetrics() if metrics else None
    if metrics:
        command += ["--metrics-port", "0"]
    started = time.perf_counter()
    orchestrator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    client = None
    try:
        port = int(orchestrator.stdout.readline().split()[1])
        client = DynamicSubclassModelConcurrentRunner(
            timeout=30, crunch_id=CRUNCH, host="127.0.0.1", port=port, base_classname=BASE_CLASS,
            security=CoordinatorSecurity.from_pki_dir(layout.root), connect_timeout=120, metrics=client_metrics,
        )
        await client.init()
        arguments = [Argument(position=1, data=Variant(type=VariantType.JSON, value=encode_data(VariantType.JSON, PAYLOAD)))]

        async def one_round() -> None:
            results = await client.call("echo", arguments)
            if results_seen is not None:
                results_seen.append(results)
            assert len(results) == n and all(r.status is CallStatus.SUCCESS for r in results.values()), [
                (r.model_id, r.reason, r.message) for r in results.values() if r.status is not CallStatus.SUCCESS
            ][:3]

        await one_round()
        ready = time.perf_counter() - started
        servers = descendants(orchestrator.pid)
        result = await (measure or _measure)(one_round, rounds, n, servers)
        runners = [pid for pid in servers if "runner" in _cmdline(pid) and "worker" not in _cmdline(pid)]
        workers = [pid for pid in servers if "secure_runner.runner.worker" in _cmdline(pid)]
        result.update(
            ready_s=ready,
            runner_rss_mb=statistics.median(rss_mb(pid) for pid in runners),
            worker_rss_mb=statistics.median(rss_mb(pid) for pid in workers),
            nodes=len(runners),
        )
        if client_metrics is not None:  # every metric really was on: the client's counted, the servers' listed
            assert _client_calls_counted(client_metrics) >= rounds * n
            assert "runner" in (layout.root.parent / "state" / "metrics-targets.json").read_text()
        return result
    finally:
        if client is not None:
            await client.close()
        orchestrator.terminate()
        orchestrator.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def _client_calls_counted(metrics: ClientMetrics) -> float:
    (calls,) = (family for family in metrics.registry.collect() if family.name == "secure_runner_client_calls")
    return sum(sample.value for sample in calls.samples)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# -- what observing costs -------------------------------------------------------------------


async def run_metrics_overhead(n: int, rounds: int, tmp: Path) -> list[dict[bool, dict]]:
    """The packed shape (b) twice at once, every metric off in one and on in the other, rounds alternating.

    Both crunches are up together and take turns round by round (which goes first alternating too),
    so the load of a shared machine falls on both alike. The crunch started second measured a few
    percent faster here with metrics off in both, so it is done twice: metrics on in the crunch
    started second, then in the one started first. Each: results by metrics on (True) / off (False).
    """
    return [await _paired_crunches(n, rounds, tmp, on_first) for on_first in (False, True)]


async def _paired_crunches(n: int, rounds: int, tmp: Path, on_first: bool) -> dict[bool, dict]:
    async def with_first(first_round, _rounds, _n, first_servers) -> dict:
        async def with_second(second_round, _rounds, _n, second_servers) -> dict:
            return await _measure_pairs({on_first: first_round, not on_first: second_round},
                                        {on_first: first_servers, not on_first: second_servers}, rounds, n)
        return await run_ours(n, rounds, tmp, None, metrics=not on_first, measure=with_second)
    return await run_ours(n, rounds, tmp, None, metrics=on_first, measure=with_first)


async def _measure_pairs(one_round: dict, server_pids: dict, rounds: int, n: int) -> dict[bool, dict]:
    for _ in range(max(5, rounds // 10)):  # warm-up
        for on in (False, True):
            await one_round[on]()
    times: dict[bool, list[float]] = {False: [], True: []}
    client_cpu = dict.fromkeys((False, True), 0.0)
    server_cpu = {on: cpu_seconds(pids) for on, pids in server_pids.items()}
    for number in range(rounds):
        for on in (False, True) if number % 2 else (True, False):
            cpu, started = time.process_time(), time.perf_counter()
            await one_round[on]()
            times[on].append(time.perf_counter() - started)
            client_cpu[on] += time.process_time() - cpu
    server_cpu = {on: cpu_seconds(pids) - server_cpu[on] for on, pids in server_pids.items()}
    results = {on: summarize(times[on], rounds * n, client_cpu[on], server_cpu[on]) for on in (False, True)}
    # Each on round against its off neighbour: the load both saw cancels out of the ratio.
    results[True]["paired_ratio"] = statistics.median(on / off for on, off in zip(times[True], times[False], strict=True))
    # Noise gauge, an A/A comparison: the off rounds run just before an on round against those just after one.
    results[False]["aa_ratio"] = statistics.median(times[False][1::2]) / statistics.median(times[False][::2])
    return results


def _print_metrics_overhead(n: int, rounds: int, arrangements: list[dict[bool, dict]]) -> None:
    print(f"\nN = {n} models, packed (b), {rounds} rounds each; metrics off and on in two crunches, rounds alternating")
    print(f"{'metrics on in':<22} {'metrics':<8} {'p50 ms':>8} {'(halves)':>15} {'p99 ms':>8} {'coord CPU':>10}"
          f" {'server CPU':>11}")
    for where, results in zip(("the crunch started 2nd", "the crunch started 1st"), arrangements, strict=True):
        for on in (False, True):
            r = results[on]
            halves = "{:.2f}/{:.2f}".format(*r["halves_ms"])
            print(f"{where:<22} {'on' if on else 'off':<8} {r['p50_ms']:>8.2f} {halves:>15} {r['p99_ms']:>8.2f}"
                  f" {r['client_cpu_us']:>7.0f} us {r['server_cpu_us']:>8.0f} us")
    keys = (("p50 round", "p50_ms"), ("coordinator CPU", "client_cpu_us"), ("server CPU", "server_cpu_us"))
    print("on/off, geometric mean of the two arrangements; start order: the crunch started 2nd against the 1st")
    for name, key in keys:
        second, first = (results[True][key] / results[False][key] for results in arrangements)
        print(f"  {name:<16} {(second * first) ** 0.5:.3f}   start order {(second / first) ** 0.5:.3f}")
    paired = [results[True]["paired_ratio"] for results in arrangements]
    gauge = [results[False]["aa_ratio"] for results in arrangements]
    print(f"  p50 of neighbouring rounds: {(paired[0] * paired[1]) ** 0.5:.3f}; noise (off vs off: before vs after"
          f" an on round): {gauge[0]:.3f}, {gauge[1]:.3f}")


# -- report ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1,10,50,100")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--metrics", action="store_true",
                        help="what observing costs: only the packed shape (b), with every metric off and on")
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
    if args.metrics:
        with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp_name:
            for n in (int(x) for x in args.models.split(",")):
                rounds = _rounds_for(n, args.rounds)
                _print_metrics_overhead(n, rounds, asyncio.run(run_metrics_overhead(n, rounds, Path(tmp_name))))
        return
    reference_harness.ensure_reference_venv()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for n in (int(x) for x in args.models.split(",")):
            rounds = _rounds_for(n, args.rounds)
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


def _rounds_for(n: int, rounds: int) -> int:
    """Fewer rounds for many models: a round of 100 takes ~20x one of 1."""
    return max(20, rounds if n <= 10 else rounds // (2 if n <= 50 else 4))


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
