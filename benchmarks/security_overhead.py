"""What security costs: per-call verification CPU and the fan-out overhead of mTLS + tokens.

Usage: python benchmarks/security_overhead.py [--models 50] [--rounds 200]

Prints (not a test; figures depend on the machine):
1. The server-side CPU of the full Secure Model Protocol check per call
   (`smp.rules.authorize_call`: peer rule, token size/format, registry lookup,
   Ed25519 verify, strict claims, time window, body hash, certificate binding,
   parse, audience, replay cache), plus the audit line the runner writes.
2. A fan-out of one call to N models, each in its own runner process with its
   own (sandboxed) worker, measured in the same run in two configurations of
   the same stack: "plain" (no TLS, no interceptor: the runner servicer and
   worker supervision only) and "secure" (what `secure-runner runner` runs:
   mTLS, token check, replay cache, audit log). Configurations alternate
   (A B A B) so drift hits both; medians are over all rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from procstat import cpu_seconds  # noqa: E402

from secure_runner import codec, pki  # noqa: E402
from secure_runner.client.security import CallSigner, CoordinatorSecurity  # noqa: E402
from secure_runner.smp import rules  # noqa: E402
from secure_runner.smp.replay import ReplayCache  # noqa: E402
from secure_runner.smp.token import model_id_field  # noqa: E402
from secure_runner.transport import tls  # noqa: E402
from secure_runner.transport.audit_log import AuditLog  # noqa: E402
from secure_runner.transport.registry_file import RegistryFile  # noqa: E402
from secure_runner.transport.status import TOKEN_KEY  # noqa: E402
from secure_runner.v1 import runner_pb2  # noqa: E402

CRUNCH = "bench"
BASE = ROOT / "tests" / "models" / "base"
SUBMISSION = ROOT / "tests" / "models" / "submissions" / "counter"
CALL_RPC = "/secure_runner.v1.ModelRunner/Call"
SETUP_RPC = "/secure_runner.v1.ModelRunner/Setup"
PRICES = [100.0 + i / 7 for i in range(100)]


def shared_call_bytes() -> bytes:
    arguments, _ = codec.encode_arguments([PRICES], {})
    return runner_pb2.CallRequest(method="echo", arguments=arguments).SerializeToString()


# -- 1. verification cost ---------------------------------------------------------------


def verification_cost(layout: pki.PkiLayout, iterations: int = 5000) -> tuple[float, float, float]:
    """Median µs per call for authorize_call, for the audit line, and for signing one token."""
    security = CoordinatorSecurity.from_pki_dir(layout.root)
    signer = CallSigner(security, CRUNCH)
    registry = RegistryFile(layout.registry).current()
    shared = shared_call_bytes()
    body = model_id_field("m0000") + shared
    cert_pem = layout.coordinator_cert.read_bytes()
    peer = (f"spiffe://{CRUNCH}/coordinator/{signer.key_id}",)
    cert_hash = tls.cert_sha256(tls.pem_to_der(cert_pem))
    sign_times, tokens = [], []
    for _ in range(iterations):
        started = time.perf_counter()
        tokens.append(signer.sign(audience=["m0000"], rpc=CALL_RPC, method="echo", shared_body=shared))
        sign_times.append(time.perf_counter() - started)
    cache = ReplayCache()
    verify_times = []
    for token in tokens:
        started = time.perf_counter()
        ctx = rules.CallContext(CRUNCH, CALL_RPC, peer, cert_hash, body, int(time.time()), 0)
        rules.authorize_call([token], ctx, registry, cache, runner_pb2.CallRequest.FromString)
        verify_times.append(time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as tmp:
        audit = AuditLog(Path(tmp) / "audit.jsonl")
        audit_times = []
        for _ in range(iterations):
            started = time.perf_counter()
            audit.record(decision="allow", code="OK", who=peer[0], what={"rpc": CALL_RPC, "model": "m0000"})
            audit_times.append(time.perf_counter() - started)
        audit.close()
    return tuple(statistics.median(t) * 1e6 for t in (verify_times, audit_times, sign_times))


# -- 2. fan-out, plain vs secure ------------------------------------------------------------


def plain_runner_main(model_id: str, port_file: str) -> None:
    """A runner without TLS or the token interceptor: the same servicer and supervision."""
    from secure_runner.cli import run_event_loop
    from secure_runner.runner.server import ModelRunnerServicer, RunnerSettings
    from secure_runner.runner.supervisor import ModelHost
    from secure_runner.v1 import runner_pb2_grpc

    class NoAudit:
        def record(self, **_: object) -> None:
            pass

    async def serve() -> None:
        host = ModelHost(model_id, SUBMISSION, [BASE])
        await host.start()
        settings = RunnerSettings(
            crunch_id=CRUNCH, node_id=model_id, models={model_id: SUBMISSION}, tls=tls.TlsFiles(Path(), Path(), Path()),
            registry=Path(), audit_log=Path(),
        )
        server = grpc.aio.server(options=tls.server_options())
        runner_pb2_grpc.add_ModelRunnerServicer_to_server(ModelRunnerServicer({model_id: host}, settings, NoAudit()), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    run_event_loop(serve())  # the same event loop as `secure-runner runner` (uvloop when installed)


class Fleet:
    """N runner processes of one configuration."""

    def __init__(self, kind: str, layout: pki.PkiLayout, model_ids: list[str], tmp: Path) -> None:
        self.kind, self.model_ids, self.procs, self.ports = kind, model_ids, [], []
        for model_id in model_ids:
            port_file = tmp / f"{kind}-{model_id}.port"
            if kind == "plain":
                command = [sys.executable, __file__, "--plain-runner", model_id, str(port_file)]
                self.procs.append(subprocess.Popen(command))
            else:
                command = [
                    sys.executable, "-m", "secure_runner.cli", "runner", "--crunch", CRUNCH,
                    "--model", f"{model_id}={SUBMISSION}", "--pki", str(layout.root), "--base-path", str(BASE),
                    "--audit-log", str(tmp / f"audit-{model_id}-{time.monotonic_ns()}.jsonl"),
                    "--log-level", "WARNING", "--exit-with-parent",
                ]
                self.procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        for proc, model_id in zip(self.procs, model_ids):
            if kind == "plain":
                port_file = tmp / f"plain-{model_id}.port"
                while not port_file.exists() or not port_file.read_text():
                    time.sleep(0.05)
                self.ports.append(int(port_file.read_text()))
                port_file.unlink()
            else:
                self.ports.append(int(proc.stdout.readline().split()[1]))

    def cpu_seconds(self) -> float:
        return cpu_seconds([proc.pid for proc in self.procs])

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)


async def fan_out(fleet: Fleet, layout: pki.PkiLayout, rounds: int) -> dict[str, float]:
    secure = fleet.kind == "secure"
    security = CoordinatorSecurity.from_pki_dir(layout.root)
    signer = CallSigner(security, CRUNCH)
    channels = []
    for model_id, port in zip(fleet.model_ids, fleet.ports):
        if secure:
            name = pki.PeerIdentity.make(CRUNCH, "runner", model_id).tls_server_name
            channels.append(grpc.aio.secure_channel(
                f"127.0.0.1:{port}", tls.channel_credentials(security.tls), options=tls.channel_options(name)))
        else:
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    setup_shared = runner_pb2.SetupRequest(base_classname="sr_testgame.base.GameBase").SerializeToString()
    for model_id, channel in zip(fleet.model_ids, channels):
        token = signer.sign(audience=[model_id], rpc=SETUP_RPC, method="", shared_body=setup_shared)
        setup = channel.unary_unary(SETUP_RPC, response_deserializer=runner_pb2.SetupResponse.FromString)
        response = await setup(model_id_field(model_id) + setup_shared, metadata=((TOKEN_KEY, token),), wait_for_ready=True, timeout=60)
        assert response.status == runner_pb2.CALL_STATUS_SUCCESS, response
    calls = [c.unary_unary(CALL_RPC, response_deserializer=runner_pb2.CallResponse.FromString) for c in channels]
    shared = shared_call_bytes()
    bodies = [model_id_field(m) + shared for m in fleet.model_ids]
    times = []
    server_cpu, client_cpu = fleet.cpu_seconds(), time.process_time()
    for round_no in range(rounds + 10):
        if round_no == 10:  # warm-up done
            server_cpu, client_cpu, times = fleet.cpu_seconds(), time.process_time(), []
        started = time.perf_counter()
        metadata = ()
        if secure:  # one signature per fan-out (audience <= 64 models)
            metadata = ((TOKEN_KEY, signer.sign(audience=fleet.model_ids, rpc=CALL_RPC, method="echo", shared_body=shared)),)
        responses = await asyncio.gather(*(call(body, metadata=metadata, timeout=10) for call, body in zip(calls, bodies)))
        times.append(time.perf_counter() - started)
        assert all(r.status == runner_pb2.CALL_STATUS_SUCCESS for r in responses)
    n_calls = rounds * len(calls)
    result = {
        "p50_ms": statistics.median(times) * 1e3,
        "p99_ms": sorted(times)[int(len(times) * 0.99) - 1] * 1e3,
        "runner_cpu_us": (fleet.cpu_seconds() - server_cpu) / n_calls * 1e6,
        "client_cpu_us": (time.process_time() - client_cpu) / n_calls * 1e6,
        "samples": times,
    }
    for channel in channels:
        await channel.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--plain-runner", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_runner:
        plain_runner_main(*args.plain_runner)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_ids = [f"m{i:04d}" for i in range(args.models)]
        layout = pki.make_test_pki(tmp / "pki", CRUNCH, [pki.ModelSpec(m, m, "c", "C") for m in model_ids], days=1)
        verify_us, audit_us, sign_us = verification_cost(layout)
        print(f"per call, server side: full check {verify_us:.1f} us + audit line {audit_us:.1f} us"
              f" = {verify_us + audit_us:.1f} us (target <= 150 us); signing one token {sign_us:.1f} us")
        results: dict[str, list[dict]] = {"plain": [], "secure": []}
        for kind in ("plain", "secure", "plain", "secure"):
            fleet = Fleet(kind, layout, model_ids, tmp)
            try:
                results[kind].append(asyncio.run(fan_out(fleet, layout, args.rounds // 2)))
            finally:
                fleet.stop()
        print(f"\nfan-out to {args.models} models, {args.rounds} rounds per configuration (2 cores, loopback):")
        print(f"{'config':<8} {'p50 ms':>8} {'p99 ms':>8} {'runner CPU/call':>16} {'client CPU/call':>16}  spread of run medians")
        summary = {}
        for kind, runs in results.items():
            samples = [t for run in runs for t in run["samples"]]
            summary[kind] = statistics.median(samples) * 1e3
            print(
                f"{kind:<8} {summary[kind]:>8.2f} {max(r['p99_ms'] for r in runs):>8.2f}"
                f" {statistics.mean(r['runner_cpu_us'] for r in runs):>13.0f} us"
                f" {statistics.mean(r['client_cpu_us'] for r in runs):>13.0f} us"
                f"  {min(r['p50_ms'] for r in runs):.2f}-{max(r['p50_ms'] for r in runs):.2f} ms"
            )
        overhead = summary["secure"] / summary["plain"] - 1
        print(f"\nsecurity overhead on the {args.models}-model fan-out: {overhead:+.1%} (target <= +25%)")


if __name__ == "__main__":
    main()
