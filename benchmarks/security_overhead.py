"""What security costs: per-call verification CPU and the fan-out overhead of mTLS + tokens.

Usage: python benchmarks/security_overhead.py [--models 50] [--rounds 200]

Prints (not a test; figures depend on the machine):
1. The server-side CPU of the full Secure Model Protocol check per call
   (`smp.rules.authorize_call`: peer rule, token size/format, registry lookup,
   Ed25519 verify, strict claims, time window, body hash, certificate binding,
   parse, audience, replay cache), plus the audit line the runner writes.
2. A fan-out of one call to N models, each with its own (sandboxed) worker,
   measured in the same run in two configurations of the same stack: "plain"
   (no TLS, no interceptor: the runner servicer and worker supervision only)
   and "secure" (what `secure-runner runner` runs: mTLS, token check, replay
   cache, audit log); for two shapes: one model per runner process, and the
   models packed onto two runners reached with one FanOut each (the orchestrator's default on
   2 cores: one runner per core).
   Configurations alternate (A B A B) so drift hits both; medians are over
   all rounds.
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


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from procstat import cpu_seconds, p99  # noqa: E402
from reference_harness import default_payload  # noqa: E402

from secure_runner import codec, pki  # noqa: E402
from secure_runner.client.fan_out import fan_out_request  # noqa: E402
from secure_runner.client.node_channel import CALL_RPC, FANOUT_RPC, SETUP_RPC  # noqa: E402
from secure_runner.orchestrator.local import pack  # noqa: E402
from secure_runner.client.security import CallSigner, CoordinatorSecurity  # noqa: E402
from secure_runner.smp import rules  # noqa: E402
from secure_runner.smp.replay import ReplayCache  # noqa: E402
from secure_runner.smp.token import MAX_DESTINATIONS, model_id_field  # noqa: E402
from secure_runner.transport import tls  # noqa: E402
from secure_runner.transport.audit_log import AuditLog  # noqa: E402
from secure_runner.transport.registry_file import RegistryFile  # noqa: E402
from secure_runner.transport.status import TOKEN_KEY  # noqa: E402
from secure_runner.v1 import runner_pb2  # noqa: E402
import grpc  # noqa: E402  after secure_runner, which sets grpc's TLS suites before grpc loads (T-1)

CRUNCH = "bench"
BASE = ROOT / "tests" / "models" / "base"
SUBMISSION = ROOT / "tests" / "models" / "submissions" / "counter"
PRICES = default_payload()


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
    destination = tls.spki_sha256(tls.pem_to_der(layout.orchestrator_cert.read_bytes()))  # any server's key
    sign_times, tokens = [], []
    for _ in range(iterations):
        started = time.perf_counter()
        tokens.append(signer.sign(
            audience=["m0000"], destinations=[destination], cert_sha256=cert_hash, rpc=CALL_RPC, method="echo",
            shared_body=shared,
        ))
        sign_times.append(time.perf_counter() - started)
    cache = ReplayCache()
    verify_times = []
    for token in tokens:
        started = time.perf_counter()
        ctx = rules.CallContext(CRUNCH, CALL_RPC, peer, cert_hash, body, int(time.time()), 0, frozenset({destination}))
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


def plain_runner_main(node_id: str, model_ids: list[str], port_file: str) -> None:
    """A runner without TLS or the token interceptor: the same servicer and supervision."""
    from secure_runner.cli import run_event_loop
    from secure_runner.runner.server import ModelRunnerServicer, RunnerSettings
    from secure_runner.runner.supervisor import ModelHost
    from secure_runner.v1 import runner_pb2_grpc

    class NoAudit:
        def record(self, **_: object) -> None:
            pass

    async def serve() -> None:
        hosts = {model_id: ModelHost(model_id, SUBMISSION, [BASE]) for model_id in model_ids}
        await asyncio.gather(*(host.start() for host in hosts.values()))
        settings = RunnerSettings(
            crunch_id=CRUNCH, node_id=node_id, models=dict.fromkeys(model_ids, SUBMISSION),
            tls=tls.TlsFiles(Path(), Path(), Path()), registry=Path(), audit_log=Path(),
        )
        server = grpc.aio.server(options=tls.server_options())
        runner_pb2_grpc.add_ModelRunnerServicer_to_server(ModelRunnerServicer(hosts, settings, NoAudit()), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    run_event_loop(serve())  # the same event loop as `secure-runner runner` (uvloop when installed)


class Fleet:
    """The runner processes of one configuration: `per_node` models per runner (a node)."""

    def __init__(self, kind: str, layout: pki.PkiLayout, model_ids: list[str], tmp: Path, per_node: int = 1) -> None:
        self.kind, self.procs, self.ports = kind, [], []
        self.nodes = pack(model_ids, per_node)  # node ids as the orchestrator names them
        port_files = []
        for node_id, models in self.nodes.items():
            port_file = tmp / f"{kind}-{node_id}-{time.monotonic_ns()}.port"
            port_files.append(port_file)
            if kind == "plain":
                command = [sys.executable, __file__, "--plain-runner", node_id, ",".join(models), str(port_file)]
                self.procs.append(subprocess.Popen(command))
                continue
            if per_node > 1:
                pki.issue_runner_certificate(layout, node_id)
            command = [
                sys.executable, "-m", "secure_runner.cli", "runner", "--crunch", CRUNCH, "--node-id", node_id,
                "--pki", str(layout.root), "--base-path", str(BASE),
                "--audit-log", str(tmp / f"audit-{node_id}-{time.monotonic_ns()}.jsonl"),
                "--log-level", "WARNING", "--exit-with-parent",
            ]
            for model_id in models:
                command += ["--model", f"{model_id}={SUBMISSION}"]
            self.procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        for proc, port_file in zip(self.procs, port_files):
            if kind == "plain":
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
    """Rounds of one echo(prices) to every model: a Call per model, or a FanOut per node."""
    secure = fleet.kind == "secure"
    security = CoordinatorSecurity.from_pki_dir(layout.root)
    signer = CallSigner(security, CRUNCH)
    cert_hash = tls.cert_sha256(tls.pem_to_der(security.tls.cert.read_bytes()))
    destination = {node_id: tls.spki_sha256(tls.pem_to_der(layout.runner_cert(node_id).read_bytes()))
                   for node_id in fleet.nodes} if secure else {}
    channels = {}
    for (node_id, models), port in zip(fleet.nodes.items(), fleet.ports):
        if secure:
            name = pki.PeerIdentity.make(CRUNCH, "runner", node_id).tls_server_name
            channels[node_id] = grpc.aio.secure_channel(
                f"127.0.0.1:{port}", tls.channel_credentials(security.tls), options=tls.channel_options(name))
        else:
            channels[node_id] = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    setup_shared = runner_pb2.SetupRequest(base_classname="sr_testgame.base.GameBase").SerializeToString()
    for node_id, models in fleet.nodes.items():
        setup = channels[node_id].unary_unary(SETUP_RPC, response_deserializer=runner_pb2.SetupResponse.FromString)
        for model_id in models:
            token = signer.sign(
                audience=[model_id], destinations=[destination.get(node_id, cert_hash)],  # plain runners ignore it
                cert_sha256=cert_hash,
                rpc=SETUP_RPC, method="", shared_body=setup_shared,
            )
            response = await setup(
                model_id_field(model_id) + setup_shared, metadata=((TOKEN_KEY, token),), wait_for_ready=True, timeout=60
            )
            assert response.status == runner_pb2.CALL_STATUS_SUCCESS, response
    shared = shared_call_bytes()
    fan_out_shared = {node_id: fan_out_request([(m, shared) for m in models], "echo", {}).SerializeToString()
                      for node_id, models in fleet.nodes.items()}
    all_models = [m for models in fleet.nodes.values() for m in models]
    calls = {node_id: channel.unary_unary(CALL_RPC, response_deserializer=runner_pb2.CallResponse.FromString)
             for node_id, channel in channels.items()}
    streams = {node_id: channel.unary_stream(FANOUT_RPC, response_deserializer=runner_pb2.FanOutResults.FromString)
               for node_id, channel in channels.items()}

    async def node_round(node_id: str, models: list[str]) -> list:
        if len(models) == 1:
            metadata = ()
            if secure:
                metadata = ((TOKEN_KEY, signer.sign(
                    audience=models, destinations=[destination[node_id]], cert_sha256=cert_hash, rpc=CALL_RPC,
                    method="echo", shared_body=shared,
                )),)
            return [await calls[node_id](model_id_field(models[0]) + shared, metadata=metadata, timeout=10)]
        body = fan_out_shared[node_id]
        metadata = ()
        if secure:  # one signature and one check per node
            metadata = ((TOKEN_KEY, signer.sign(
                audience=models, destinations=[destination[node_id]], cert_sha256=cert_hash, rpc=FANOUT_RPC,
                method="echo", shared_body=body,
            )),)
        stream = streams[node_id](model_id_field(node_id) + body, metadata=metadata, timeout=10)
        return [result.response async for batch in stream for result in batch.results]

    async def one_round() -> list:
        if all(len(models) == 1 for models in fleet.nodes.values()) and secure:
            # One-model runners: one signature per MAX_DESTINATIONS runners, as the client signs.
            nodes = list(fleet.nodes.items())
            tokens = {}
            for start in range(0, len(nodes), MAX_DESTINATIONS):
                chunk = nodes[start : start + MAX_DESTINATIONS]
                token = signer.sign(
                    audience=[models[0] for _, models in chunk], destinations=[destination[n] for n, _ in chunk],
                    cert_sha256=cert_hash, rpc=CALL_RPC, method="echo", shared_body=shared,
                )
                tokens.update(dict.fromkeys((n for n, _ in chunk), token))
            return await asyncio.gather(*(
                calls[node_id](model_id_field(models[0]) + shared, metadata=((TOKEN_KEY, tokens[node_id]),), timeout=10)
                for node_id, models in nodes
            ))
        batches = await asyncio.gather(*(node_round(node_id, models) for node_id, models in fleet.nodes.items()))
        return [response for batch in batches for response in batch]

    times = []
    server_cpu, client_cpu = fleet.cpu_seconds(), time.process_time()
    for round_no in range(rounds + 10):
        if round_no == 10:  # warm-up done
            server_cpu, client_cpu, times = fleet.cpu_seconds(), time.process_time(), []
        started = time.perf_counter()
        responses = await one_round()
        times.append(time.perf_counter() - started)
        assert len(responses) == len(all_models) and all(r.status == runner_pb2.CALL_STATUS_SUCCESS for r in responses)
    n_calls = rounds * len(all_models)
    result = {
        "p50_ms": statistics.median(times) * 1e3,
        "p99_ms": p99(times) * 1e3,
        "runner_cpu_us": (fleet.cpu_seconds() - server_cpu) / n_calls * 1e6,
        "client_cpu_us": (time.process_time() - client_cpu) / n_calls * 1e6,
        "samples": times,
    }
    for channel in channels.values():
        await channel.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--plain-runner", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_runner:
        node_id, model_ids, port_file = args.plain_runner
        plain_runner_main(node_id, model_ids.split(","), port_file)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_ids = [f"m{i:04d}" for i in range(args.models)]
        layout = pki.make_test_pki(tmp / "pki", CRUNCH, [pki.ModelSpec(m, m, "c", "C") for m in model_ids], days=1)
        verify_us, audit_us, sign_us = verification_cost(layout)
        print(f"per call, server side: full check {verify_us:.1f} us + audit line {audit_us:.1f} us"
              f" = {verify_us + audit_us:.1f} us (target <= 150 us); signing one token {sign_us:.1f} us")
        for per_node in (1, max(1, -(-args.models // 2))):
            report_shape(layout, model_ids, tmp, per_node, args.rounds)


def report_shape(layout: pki.PkiLayout, model_ids: list[str], tmp: Path, per_node: int, rounds: int) -> None:
    """Plain and secure, alternating (A B A B), for one packing of the models onto runners."""
    results: dict[str, list[dict]] = {"plain": [], "secure": []}
    for kind in ("plain", "secure", "plain", "secure"):
        fleet = Fleet(kind, layout, model_ids, tmp, per_node)
        try:
            results[kind].append(asyncio.run(fan_out(fleet, layout, rounds // 2)))
        finally:
            fleet.stop()
    shape = "one model per runner" if per_node == 1 else f"{per_node} models per runner, one FanOut per runner"
    print(f"\nfan-out to {len(model_ids)} models, {shape}; {rounds} rounds per configuration (2 cores, loopback):")
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
    print(f"security overhead ({shape}): {overhead:+.1%} (target <= +25%)")


if __name__ == "__main__":
    main()
