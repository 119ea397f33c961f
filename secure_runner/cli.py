"""`secure-runner`: the demo, a runner, an orchestrator and the test PKI."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path

from secure_runner import log_format
from secure_runner.errors import SecureRunnerError

LOG_FILE_BYTES = 8 << 20  # a runner's log file is rotated at this size (one old file kept): a model's output is bounded


def _model_arg(value: str) -> tuple[str, Path]:
    model_id, sep, path = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("expected MODEL_ID=PATH")
    return model_id, Path(path)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"],
        help="json: one JSON object per line (time, level, logger, message; model, node, deployment, reason "
        "where they apply); default text",
    )


def _add_metrics_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port", type=int, default=None,
        help="serve Prometheus metrics (counts, no secrets) at http://HOST:PORT/metrics; default: off. "
        "0: any free port, printed in the READY line as metrics=<port>",
    )
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default 127.0.0.1)")
    parser.add_argument(
        "--metrics-tls", action="store_true",
        help="serve metrics over mutual TLS 1.3 with this process's own certificate: only scrapers presenting a "
        "certificate of the crunch CA are answered",
    )


def _metrics_endpoint(args: argparse.Namespace):
    """The metrics endpoint the flags ask for; None when --metrics-port is not given."""
    from secure_runner.metrics import MetricsEndpoint

    if args.metrics_port is None:
        if args.metrics_tls or args.metrics_host != "127.0.0.1":
            raise SystemExit(f"secure-runner {args.command}: --metrics-host and --metrics-tls need --metrics-port")
        return None
    return MetricsEndpoint(port=args.metrics_port, host=args.metrics_host, tls=args.metrics_tls)


async def _serve_until_signalled(make_server, make_control=None) -> None:
    """Build the server inside the running loop (grpc.aio binds to it), serve until SIGINT/SIGTERM.

    `make_control(server)`, if given, makes the runner's control channel, listening before READY.
    A server serving metrics names their port in its READY line: `READY <port> metrics=<port>`.
    """
    server = make_server()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    channel = make_control(server) if make_control is not None else None
    if channel is not None:
        await channel.start()
    metrics = f" metrics={server.metrics_server.port}" if server.metrics_server is not None else ""
    print(f"READY {port}{metrics}", flush=True)
    await stop.wait()
    if channel is not None:
        channel.close()
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
    chain_config = _chain_config(args, "runner")
    missing = [flag for flag, value in (("--cert", cert), ("--key", key), ("--ca", ca)) if not value]
    if chain_config is None and not registry:
        missing.append("--registry")
    if missing:
        raise SystemExit(f"secure-runner runner: missing {', '.join(missing)}")
    settings = RunnerSettings(
        crunch_id=args.crunch,
        node_id=node_id,
        models=models,
        tls=TlsFiles(Path(cert), Path(key), Path(ca)),
        registry=None if chain_config else Path(registry),
        chain_config=chain_config,
        audit_log=args.audit_log,
        replay_cache_size=args.replay_cache_size,
        time_policy=TimePolicy(
            skew_seconds=args.clock_skew, max_lifetime_seconds=args.max_token_lifetime,
            max_registry_age_seconds=args.max_registry_age,
        ),
        handshake_timeout_ms=args.handshake_timeout_ms,
        base_paths=args.base_path,
        host=args.host,
        port=args.port,
        limits=sandbox_options.limits_from(args),
        sandbox=sandbox_options.policy_from(args),
        worker_template=sandbox_options.worker_template_from(args),
        metrics=_metrics_endpoint(args),
    )
    make_control = None
    if args.control_socket:  # refused before anything starts if the socket's directory is not private
        control.check_socket_path(args.control_socket)
        control.check_private_directory(args.control_socket.parent)
        make_control = functools.partial(control.ControlChannel, path=args.control_socket, deployment=args.deployment)
    run_event_loop(_serve_until_signalled(lambda: RunnerServer(settings), make_control))
    return 0


def _chain_config(args: argparse.Namespace, command: str) -> Path | None:
    """The chain registry's configuration file if `--registry-source chain` selects it, else None (the file)."""
    if args.registry_source != "chain":
        return None
    if args.chain_config is None:
        raise SystemExit(f"secure-runner {command}: --registry-source chain needs --chain-config FILE")
    return args.chain_config.resolve()


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
        state_dir=args.state_dir,
        stop_models_on_exit=args.stop_models_on_exit,
        models_per_node=args.models_per_node or (1 if args.backend == "kubernetes" else 0),  # a Pod per model
        credentials_mode=args.credentials,
        runner_log_format=args.log_format,
        chain_config=_chain_config(args, "orchestrator"),
        metrics=_metrics_endpoint(args),
    )
    launcher = None  # the default: local runner processes
    if args.backend == "kubernetes":
        from secure_runner import pki
        from secure_runner.orchestrator.kubernetes import KubernetesLauncher, load_settings

        if args.kubernetes_settings is None:
            raise SystemExit("secure-runner orchestrator: --backend kubernetes needs --kubernetes-settings FILE")
        launcher = KubernetesLauncher(load_settings(args.kubernetes_settings), args.crunch, pki.PkiLayout(args.pki))
    run_event_loop(_serve_until_signalled(lambda: LocalOrchestrator(settings, launcher=launcher)))
    return 0


def _add_sandbox_flags(parser: argparse.ArgumentParser) -> None:
    from secure_runner.runner.sandbox import options

    options.add_flags(parser)


def _sandbox_check(args: argparse.Namespace) -> int:
    """Start a throwaway worker that applies and verifies each layer; exit 1 if a required one is missing."""
    from secure_runner.runner.sandbox import options
    from secure_runner.runner.supervisor import check_sandbox

    policy = options.policy_from(args)
    layers = asyncio.run(check_sandbox(options.limits_from(args), policy, options.worker_template_from(args)))
    print(options.format_report(layers, policy))
    return 1 if policy.refusal(layers) else 0


def _demo(args: argparse.Namespace) -> int:
    from secure_runner.demo import run_demo

    return asyncio.run(run_demo(rounds=args.rounds, examples=args.examples, timeout=args.timeout))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secure-runner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="PKI, orchestrator, example models and a coordinator, end to end")
    demo.add_argument("--rounds", type=int, default=3, help="coordinator rounds of tick + predict (default 3)")
    demo.add_argument("--timeout", type=float, default=1.0, help="per-call timeout in seconds")
    demo.add_argument("--examples", type=Path, default=None, help="examples folder (default: the repo's)")
    _add_common(demo)
    demo.set_defaults(func=_demo, log_level="ERROR")

    runner = sub.add_parser("runner", help="serve submissions (each in its own worker subprocess)")
    runner.add_argument("--crunch", required=True, help="the crunch id")
    runner.add_argument(
        "--model", type=_model_arg, action="append", required=True, metavar="ID=PATH",
        help="a submission to host: its model id and folder (repeatable: a model node)",
    )
    runner.add_argument(
        "--node-id", help="this runner's identity (its TLS certificate names it); default: its only model's id"
    )
    runner.add_argument("--pki", type=Path, help="a `pki init` folder to take the files below from")
    runner.add_argument("--cert", type=Path, help="this runner's TLS certificate (default: from --pki)")
    runner.add_argument("--key", type=Path, help="its TLS key (default: from --pki)")
    runner.add_argument("--ca", type=Path, help="the crunch CA certificate (default: from --pki)")
    runner.add_argument("--registry", type=Path, help="the registry file (default: from --pki)")
    runner.add_argument(
        "--registry-source", choices=("file", "chain"), default="file",
        help="where the crunch's identities come from: the registry file (default) or the chain (--chain-config)",
    )
    runner.add_argument("--chain-config", type=Path, help="the chain registry's configuration (JSON, see README)")
    runner.add_argument("--base-path", type=Path, action="append", default=[], help="folder with the base class")
    runner.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    runner.add_argument("--port", type=int, default=0, help="port to serve on (default 0: any free port, printed as READY <port>)")
    runner.add_argument("--audit-log", type=Path, default=Path("audit.jsonl"), help="hash-chained decision log")
    runner.add_argument("--replay-cache-size", type=int, default=200_000, help="nonces remembered (fails closed)")
    runner.add_argument("--clock-skew", type=int, default=5, help="seconds of clock skew tolerated")
    runner.add_argument("--max-token-lifetime", type=int, default=60, help="seconds")
    runner.add_argument(
        "--max-registry-age", type=int, default=60,
        help="seconds the registry may go without a successful reload before every call is refused",
    )
    runner.add_argument("--handshake-timeout-ms", type=int, default=5_000, help="TLS handshake timeout (default 5000)")
    runner.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    runner.add_argument(
        "--control-socket", type=Path,
        help="unix socket for the orchestrator's STOP / REDEPLOY / STATUS commands (runner/control.py); "
        "its directory must be this user's, mode 0700",
    )
    runner.add_argument(
        "--deployment", default="manual", help="the deployment id this runner was started as (answered on STATUS)"
    )
    runner.add_argument(
        "--log-file", type=Path,
        help="write logs (worker output included) to this file, rotated at 8 MiB, instead of stderr",
    )
    _add_sandbox_flags(runner)
    _add_metrics_flags(runner)
    _add_common(runner)
    runner.set_defaults(func=_runner)

    orch = sub.add_parser(
        "orchestrator", help="start a runner per submission folder and serve the model list",
        description="Serve a crunch's model list (and the operator RPCs) over mTLS, running its submissions as "
        "runner processes. Runners outlive the orchestrator: a restarted orchestrator adopts the runners still "
        "alive (same deployments) from its state store and restarts only the dead ones.",
    )
    orch.add_argument("--crunch", required=True, help="the crunch id")
    orch.add_argument(
        "--submissions", type=Path, required=True,
        help="folder of submissions, one subfolder per model, named by its model id (registered models only)",
    )
    orch.add_argument(
        "--pki", type=Path, required=True,
        help="a `pki init` folder (test-pki), or the runner host's folder (production): CA certificate, "
        "certificates, registry.json",
    )
    orch.add_argument(
        "--credentials", choices=["test-pki", "production"], default="test-pki",
        help="test-pki (default; DEMO AND TESTS ONLY): this orchestrator is the CA and signs delegations with the "
        "crunchers' keys from --pki. production: it holds neither; runner certificates (CSRs the operator signed) "
        "and delegations (signed by each cruncher) are installed with `secure-runner pki runner-host ...`",
    )
    orch.add_argument(
        "--registry-source", choices=("file", "chain"), default="file",
        help="where it and its runners read the crunch's identities: --pki's registry.json (default) or the chain",
    )
    orch.add_argument("--chain-config", type=Path, help="the chain registry's configuration (JSON, see README)")
    orch.add_argument(
        "--base-path", type=Path, action="append", default=[],
        help="folder holding the game's base class, readable by every worker (repeatable)",
    )
    orch.add_argument("--audit-dir", type=Path, default=None, help="default: `audit` beside the PKI folder")
    orch.add_argument(
        "--state-dir", type=Path, default=None,
        help="the durable state (SQLite store, runners' control sockets, runner logs); default: `state` beside "
        "the PKI folder",
    )
    orch.add_argument(
        "--stop-models-on-exit", action=argparse.BooleanOptionalAction, default=False,
        help="on SIGINT/SIGTERM, stop every runner too (default: no, they keep serving and the next orchestrator "
        "adopts them; a SIGKILLed orchestrator never stops them)",
    )
    orch.add_argument(
        "--models-per-node", type=int, default=0,
        help="models hosted by one runner process, each in its own sandboxed worker "
        "(default 0 = auto: at most one runner per CPU core; 1 = a runner per model)",
    )
    orch.add_argument(
        "--backend", choices=["local", "kubernetes"], default="local",
        help="where runners run: local processes (default), or one hardened Pod per node (README: Deploying on "
        "Kubernetes; needs the `kubernetes` extra and --kubernetes-settings; --models-per-node defaults to 1 there)",
    )
    orch.add_argument(
        "--kubernetes-settings", type=Path, default=None,
        help="JSON file of the Kubernetes backend's settings (namespace, image, submissions_claim, runtime_class, "
        "cpu, memory, max_restarts, restart_window_seconds, ...: orchestrator/kubernetes.py KubernetesSettings)",
    )
    orch.add_argument("--host", default="127.0.0.1", help="address to serve on, and runners' too (default 127.0.0.1)")
    orch.add_argument("--port", type=int, default=9091, help="port to serve on (default 9091; 0: any free port)")
    _add_metrics_flags(orch)  # its runners then serve theirs too, listed in <state>/metrics-targets.json
    _add_common(orch)
    orch.set_defaults(func=_orchestrator)

    sub.add_parser(
        "pki", help="keys and certificates: per party (ca, coordinator, operator, cruncher, runner-host, registry) "
        "or the demo's one-shot test PKI (init); see `secure-runner pki --help`", add_help=False,
    )

    check = sub.add_parser("sandbox-check", help="probe which worker sandbox layers work on this machine")
    _add_sandbox_flags(check)
    _add_common(check)
    check.set_defaults(func=_sandbox_check, log_level="ERROR")
    sub.add_parser("audit", help="verify an audit log (see `secure-runner audit verify --help`)", add_help=False)
    sub.add_parser(
        "models", help="operator: list, stop, redeploy, restart-node, logs (see `secure-runner models --help`)",
        add_help=False,
    )
    sub.add_parser(
        "status", help="a live table of every model: state, node, deployment, uptime, last call, failures "
        "(see `secure-runner status --help`)", add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pki"]:
        from secure_runner import pki

        return pki.main(argv[1:])
    if argv[:1] == ["audit"]:
        from secure_runner import audit_cli

        return audit_cli.main(argv[1:])
    if argv[:1] == ["models"]:
        from secure_runner import operator_cli

        return operator_cli.main(argv[1:])
    if argv[:1] == ["status"]:
        from secure_runner import status_cli

        return status_cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    log_file = getattr(args, "log_file", None)
    handler = (
        logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_FILE_BYTES, backupCount=1)
        if log_file else logging.StreamHandler()
    )
    handler.setFormatter(log_format.formatter(args.log_format))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    try:
        return args.func(args)
    except SecureRunnerError as exc:
        print(f"secure-runner: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
