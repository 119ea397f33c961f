"""`secure-runner`: the demo, a runner, an orchestrator and the test PKI."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from secure_runner.errors import SecureRunnerError


def _model_arg(value: str) -> tuple[str, Path]:
    model_id, sep, path = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("expected MODEL_ID=PATH")
    return model_id, Path(path)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


async def _serve_until_signalled(make_server, control=None) -> None:
    """Build the server inside the running loop (grpc.aio binds to it), serve until SIGINT/SIGTERM.

    `control(server)`, if given, runs once the server is ready; its end stops the server too.
    """
    server = make_server()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    print(f"READY {port}", flush=True)
    if control is not None:
        controlling = asyncio.create_task(control(server))
        controlling.add_done_callback(lambda _task: stop.set())
    await stop.wait()
    await server.stop()


def run_event_loop(main) -> None:
    """Run a server's event loop: uvloop when installed (the `fast` extra), ~10% less CPU per call."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _runner(args: argparse.Namespace) -> int:
    from secure_runner import pki
    from secure_runner.runner import control, lifetime
    from secure_runner.runner.server import RunnerServer, RunnerSettings
    from secure_runner.runner.sandbox import options as sandbox_options
    from secure_runner.smp.rules import TimePolicy
    from secure_runner.transport.tls import TlsFiles

    if args.exit_with_parent:
        lifetime.die_with_parent(os.getppid(), signal.SIGTERM)
    models = dict(args.model)
    node_id = args.node_id or (next(iter(models)) if len(models) == 1 else None)
    if node_id is None:
        raise SystemExit("secure-runner runner: a runner hosting several models needs --node-id")
    cert, key, ca, registry = args.cert, args.key, args.ca, args.registry
    if args.pki:  # fill what was not given from a `pki init` layout
        layout = pki.PkiLayout(args.pki)
        ca, registry = ca or layout.ca_cert, registry or layout.registry
        cert, key = cert or layout.runner_cert(node_id), key or layout.runner_key(node_id)
    missing = [flag for flag, value in (("--cert", cert), ("--key", key), ("--ca", ca), ("--registry", registry)) if not value]
    if missing:
        raise SystemExit(f"secure-runner runner: missing {', '.join(missing)}")
    settings = RunnerSettings(
        crunch_id=args.crunch,
        node_id=node_id,
        models=models,
        tls=TlsFiles(Path(cert), Path(key), Path(ca)),
        registry=Path(registry),
        audit_log=args.audit_log,
        replay_cache_size=args.replay_cache_size,
        time_policy=TimePolicy(skew_seconds=args.clock_skew, max_lifetime_seconds=args.max_token_lifetime),
        handshake_timeout_ms=args.handshake_timeout_ms,
        base_paths=args.base_path,
        host=args.host,
        port=args.port,
        limits=sandbox_options.limits_from(args),
        sandbox=sandbox_options.policy_from(args),
    )
    serve_control = control.serve if args.control_stdin else None
    run_event_loop(_serve_until_signalled(lambda: RunnerServer(settings), serve_control))
    return 0


def _orchestrator(args: argparse.Namespace) -> int:
    from secure_runner.orchestrator.local import LocalOrchestrator, LocalOrchestratorSettings

    settings = LocalOrchestratorSettings(
        crunch_id=args.crunch,
        submissions=args.submissions,
        pki_dir=args.pki,
        base_paths=args.base_path,
        host=args.host,
        port=args.port,
        audit_dir=args.audit_dir,
        models_per_node=args.models_per_node,
    )
    run_event_loop(_serve_until_signalled(lambda: LocalOrchestrator(settings)))
    return 0


def _add_sandbox_flags(parser: argparse.ArgumentParser) -> None:
    from secure_runner.runner.sandbox import options

    options.add_flags(parser)


def _sandbox_check(args: argparse.Namespace) -> int:
    """Start a throwaway worker that applies and verifies each layer; exit 1 if a required one is missing."""
    from secure_runner.runner.sandbox import options
    from secure_runner.runner.supervisor import check_sandbox

    policy = options.policy_from(args)
    layers = asyncio.run(check_sandbox(options.limits_from(args), policy))
    print(options.format_report(layers, policy))
    return 1 if policy.refusal(layers) else 0


def _demo(args: argparse.Namespace) -> int:
    from secure_runner.demo import run_demo

    return asyncio.run(run_demo(rounds=args.rounds, examples=args.examples, timeout=args.timeout))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secure-runner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="PKI, orchestrator, example models and a coordinator, end to end")
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument("--timeout", type=float, default=1.0, help="per-call timeout in seconds")
    demo.add_argument("--examples", type=Path, default=None, help="examples folder (default: the repo's)")
    _add_common(demo)
    demo.set_defaults(func=_demo, log_level="ERROR")

    runner = sub.add_parser("runner", help="serve submissions (each in its own worker subprocess)")
    runner.add_argument("--crunch", required=True)
    runner.add_argument("--model", type=_model_arg, action="append", required=True, metavar="ID=PATH")
    runner.add_argument(
        "--node-id", help="this runner's identity (its TLS certificate names it); default: its only model's id"
    )
    runner.add_argument("--pki", type=Path, help="a `pki init` folder to take the files below from")
    runner.add_argument("--cert", type=Path)
    runner.add_argument("--key", type=Path)
    runner.add_argument("--ca", type=Path)
    runner.add_argument("--registry", type=Path)
    runner.add_argument("--base-path", type=Path, action="append", default=[], help="folder with the base class")
    runner.add_argument("--host", default="127.0.0.1")
    runner.add_argument("--port", type=int, default=0)
    runner.add_argument("--audit-log", type=Path, default=Path("audit.jsonl"), help="hash-chained decision log")
    runner.add_argument("--replay-cache-size", type=int, default=200_000, help="nonces remembered (fails closed)")
    runner.add_argument("--clock-skew", type=int, default=5, help="seconds of clock skew tolerated")
    runner.add_argument("--max-token-lifetime", type=int, default=60, help="seconds")
    runner.add_argument("--handshake-timeout-ms", type=int, default=5_000)
    runner.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    # Per-model STOP / REDEPLOY commands from the parent on stdin; its end of file stops the runner.
    runner.add_argument("--control-stdin", action="store_true", help=argparse.SUPPRESS)
    _add_sandbox_flags(runner)
    _add_common(runner)
    runner.set_defaults(func=_runner)

    orch = sub.add_parser("orchestrator", help="start a runner per submission folder and serve the model list")
    orch.add_argument("--crunch", required=True)
    orch.add_argument("--submissions", type=Path, required=True)
    orch.add_argument("--pki", type=Path, required=True)
    orch.add_argument("--base-path", type=Path, action="append", default=[])
    orch.add_argument("--audit-dir", type=Path, default=None, help="default: `audit` beside the PKI folder")
    orch.add_argument(
        "--models-per-node", type=int, default=0,
        help="models hosted by one runner process, each in its own sandboxed worker "
        "(default 0 = auto: at most one runner per CPU core; 1 = a runner per model)",
    )
    orch.add_argument("--host", default="127.0.0.1")
    orch.add_argument("--port", type=int, default=0)
    _add_common(orch)
    orch.set_defaults(func=_orchestrator)

    sub.add_parser("pki", help="make a test PKI (see `secure-runner pki init --help`)", add_help=False)

    check = sub.add_parser("sandbox-check", help="probe which worker sandbox layers work on this machine")
    _add_sandbox_flags(check)
    _add_common(check)
    check.set_defaults(func=_sandbox_check, log_level="ERROR")
    sub.add_parser("audit", help="verify an audit log (see `secure-runner audit verify --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pki"]:
        from secure_runner import pki

        return pki.main(argv[1:])
    if argv[:1] == ["audit"]:
        from secure_runner import audit_cli

        return audit_cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SecureRunnerError as exc:
        print(f"secure-runner: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
