"""What a flood from a wrongly authenticated peer costs a runner, and its real coordinator.

Usage: python benchmarks/flood.py [--connections 4] [--streams 4] [--body-mib 48] [--rounds 3]

Everything on 127.0.0.1, every process a child of this one. One real `secure-runner runner`
(its default options) hosts the test game's counter model; a real coordinator (its own
certificate and signing key) calls `echo` back to back, first alone, then while a flooder
holding a *runner's* certificate from the same crunch CA (accepted by TLS, refused by SMP-1)
sends, per round and from `--connections` connections at once:

- `--streams` uncompressed requests of `--body-mib` MiB per connection (Call),
- `--streams` gzip-compressed requests of `--body-mib` MiB of zeros per connection (~0.1 MiB on the wire),
- 500 small requests per connection (more than `grpc.max_concurrent_streams`).

Printed: the runner process's resident memory before, its peak during the flood (sampled every
20 ms) and the growth; the coordinator's call latency p50/p99 alone and during the flood, and
how many of its calls failed; what the flooder's calls ended with. Bounded: `--rounds` rounds,
and the flood stops after `--max-seconds` whatever is left.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from procstat import p99, rss_mb  # noqa: E402

from secure_runner import codec, pki  # noqa: E402
from secure_runner.client.security import CallSigner, CoordinatorSecurity  # noqa: E402
from secure_runner.smp.identity import PeerIdentity, Role  # noqa: E402
from secure_runner.smp.token import model_id_field  # noqa: E402
from secure_runner.transport import tls  # noqa: E402
from secure_runner.transport.status import TOKEN_KEY, reason_of  # noqa: E402
from secure_runner.v1 import runner_pb2  # noqa: E402
import grpc  # noqa: E402  after secure_runner, which sets grpc's TLS suites before grpc loads (T-1)

CRUNCH = "flood"
MODEL = "counter"
MODELS = REPO / "tests" / "models"
CALL_RPC = "/secure_runner.v1.ModelRunner/Call"
SETUP_RPC = "/secure_runner.v1.ModelRunner/Setup"
SMALL_STREAMS = 500


class Runner:
    """A real `secure-runner runner` process hosting the counter model."""

    def __init__(self, layout: pki.PkiLayout, tmp: Path) -> None:
        command = [
            sys.executable, "-m", "secure_runner.cli", "runner", "--crunch", CRUNCH,
            "--model", f"{MODEL}={MODELS / 'submissions' / MODEL}", "--pki", str(layout.root),
            "--base-path", str(MODELS / "base"), "--audit-log", str(tmp / "audit.jsonl"),
            "--log-level", "ERROR", "--exit-with-parent",
        ]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline().split()[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class PeakRss:
    """Samples a process's resident memory every 20 ms in a thread; `peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss_mb(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


class Coordinator:
    """Signed echo calls over the coordinator's own certificate, latencies kept per phase."""

    def __init__(self, layout: pki.PkiLayout, port: int) -> None:
        security = CoordinatorSecurity.from_pki_dir(layout.root)
        signer = CallSigner(security, CRUNCH)
        runner_key = tls.spki_sha256(tls.pem_to_der(layout.runner_cert(MODEL).read_bytes()))
        own_cert = tls.cert_sha256(tls.pem_to_der(layout.coordinator_cert.read_bytes()))

        def sign(**fields) -> bytes:
            return signer.sign(audience=[MODEL], destinations=[runner_key], cert_sha256=own_cert, **fields)

        self.sign = sign
        name = PeerIdentity.make(CRUNCH, Role.RUNNER, MODEL).tls_server_name
        self.channel = grpc.aio.secure_channel(
            f"127.0.0.1:{port}", tls.channel_credentials(security.tls), options=tls.channel_options(name)
        )
        arguments, _ = codec.encode_arguments(["ping"], {})
        self.shared = runner_pb2.CallRequest(method="echo", arguments=arguments).SerializeToString()

    async def setup(self) -> None:
        shared = runner_pb2.SetupRequest(base_classname="sr_testgame.base.GameBase").SerializeToString()
        setup = self.channel.unary_unary(SETUP_RPC, response_deserializer=runner_pb2.SetupResponse.FromString)
        for _ in range(30):  # a runner refuses tokens signed before it started (SMP-10): wait that out
            token = self.sign(rpc=SETUP_RPC, method="", shared_body=shared)
            try:
                response = await setup(model_id_field(MODEL) + shared, metadata=((TOKEN_KEY, token),), timeout=60)
                break
            except grpc.aio.AioRpcError as exc:
                if reason_of(exc) != "TOKEN_ISSUED_BEFORE_START":
                    raise
                await asyncio.sleep(0.5)
        assert response.status == runner_pb2.CALL_STATUS_SUCCESS, response

    async def call(self) -> float | None:
        """One echo call's latency in seconds, None if it failed."""
        token = self.sign(rpc=CALL_RPC, method="echo", shared_body=self.shared)
        call = self.channel.unary_unary(CALL_RPC, response_deserializer=runner_pb2.CallResponse.FromString)
        started = time.perf_counter()
        try:
            response = await call(model_id_field(MODEL) + self.shared, metadata=((TOKEN_KEY, token),), timeout=5)
        except grpc.aio.AioRpcError:
            return None
        return time.perf_counter() - started if response.status == runner_pb2.CALL_STATUS_SUCCESS else None

    async def calls_until(self, done: asyncio.Event) -> list[float | None]:
        latencies = []
        while not done.is_set():
            latencies.append(await self.call())
        return latencies


async def flood(layout: pki.PkiLayout, port: int, args: argparse.Namespace) -> collections.Counter:
    """The flooder's rounds, from a runner certificate; the outcome (status code) of every request.

    Runs in a process of its own (`--flooder`), so the coordinator's event loop is not the flooder's.
    """
    files = tls.TlsFiles(layout.runner_cert(MODEL), layout.runner_key(MODEL), layout.ca_cert)
    name = PeerIdentity.make(CRUNCH, Role.RUNNER, MODEL).tls_server_name
    options = [(k, -1 if k == "grpc.max_send_message_length" else v) for k, v in tls.channel_options(name)]
    channels = [
        grpc.aio.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(files), options=options)
        for _ in range(args.connections)
    ]
    big = model_id_field(MODEL) + b"\0" * (args.body_mib << 20)
    small = model_id_field(MODEL) + b"\0" * 64
    outcomes: collections.Counter = collections.Counter()

    async def send(channel: grpc.aio.Channel, body: bytes, compression=None) -> None:
        try:
            await channel.unary_unary(CALL_RPC)(body, timeout=30, compression=compression)
            outcomes["OK (!)"] += 1
        except grpc.aio.AioRpcError as exc:
            outcomes[exc.code().name] += 1

    deadline = time.monotonic() + args.max_seconds
    for _ in range(args.rounds):
        if time.monotonic() > deadline:
            break
        requests = []
        for channel in channels:
            requests += [send(channel, big) for _ in range(args.streams)]
            requests += [send(channel, big, grpc.Compression.Gzip) for _ in range(args.streams)]
            requests += [send(channel, small) for _ in range(SMALL_STREAMS)]
        await asyncio.wait_for(asyncio.gather(*requests), max(deadline - time.monotonic(), 1))
    for channel in channels:
        await channel.close()
    return outcomes


def _ms(latencies: list[float | None]) -> str:
    ok = [t for t in latencies if t is not None]
    failed = len(latencies) - len(ok)
    if not ok:
        return f"no call succeeded ({failed} failed)"
    return (f"p50 {statistics.median(ok) * 1e3:7.1f} ms  p99 {p99(ok) * 1e3:7.1f} ms  "
            f"({len(ok)} calls, {failed} failed)")


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        layout = pki.make_test_pki(Path(tmp) / "pki", CRUNCH, [pki.ModelSpec(MODEL, "Counter", "alice", "Alice")])
        runner = Runner(layout, Path(tmp))
        try:
            coordinator = Coordinator(layout, runner.port)
            await coordinator.setup()
            alone = [await coordinator.call() for _ in range(args.calls)]
            before = rss_mb(runner.proc.pid)
            sampler = PeakRss(runner.proc.pid)
            done = asyncio.Event()
            calls = asyncio.ensure_future(coordinator.calls_until(done))
            started = time.perf_counter()
            outcomes = await asyncio.to_thread(_flooder_process, layout, runner.port, args)
            flood_seconds = time.perf_counter() - started
            done.set()
            during = await calls
            peak = sampler.stop()
            await coordinator.channel.close()
        finally:
            runner.stop()
    per_round = args.connections * (2 * args.streams + SMALL_STREAMS)
    print(f"flood: {args.rounds} rounds x {args.connections} connections x ({args.streams} x {args.body_mib} MiB"
          f" + {args.streams} x {args.body_mib} MiB gzip + {SMALL_STREAMS} small) = {per_round} requests a round,"
          f" {flood_seconds:.1f} s, from a runner certificate")
    print(f"flooder's requests ended: {outcomes}")
    print(f"runner RSS: {before:.0f} MiB before, peak {peak:.0f} MiB during, growth {peak - before:.0f} MiB")
    print(f"coordinator alone:        {_ms(alone)}")
    print(f"coordinator during flood: {_ms(during)}")


def _flooder_process(layout: pki.PkiLayout, port: int, args: argparse.Namespace) -> dict[str, int]:
    options = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if name != "flooder"]
    command = [sys.executable, __file__, *options, f"--flooder={layout.root}:{port}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.max_seconds + 60, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=4, help="big requests of each kind per connection and round")
    parser.add_argument("--body-mib", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=100, help="coordinator calls measured before the flood")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--flooder", help=argparse.SUPPRESS)  # PKI_ROOT:PORT, run as the flooding process
    args = parser.parse_args()
    if args.flooder:
        root, port = args.flooder.rsplit(":", 1)
        print(json.dumps(asyncio.run(flood(pki.PkiLayout(Path(root)), int(port), args))))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
