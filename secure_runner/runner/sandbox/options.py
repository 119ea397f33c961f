"""Command-line flags for the sandbox (`secure-runner runner`, `sandbox-check`) and the check's report."""

from __future__ import annotations

import argparse
import logging
import os
import platform

from secure_runner.runner.sandbox.policy import LAYERS, POD_SHARING, PROFILES, LayerResult, SandboxPolicy, WorkerLimits

log = logging.getLogger(__name__)

# The same explicit opt-out as --allow-missing-layer, for runners started by another program
# (the embedded orchestrator): comma-separated layer names. Logged like the flag.
ALLOW_MISSING_ENV = "SECURE_RUNNER_ALLOW_MISSING_LAYERS"
# The default of --worker-template for runners started by another program: "on" or "off".
WORKER_TEMPLATE_ENV = "SECURE_RUNNER_WORKER_TEMPLATE"
MIB = 1 << 20
_DEFAULTS = WorkerLimits()
# flag, WorkerLimits field, unit multiplier, help
_LIMIT_FLAGS = (
    ("--memory-mib", "memory_bytes", MIB, "cgroup memory limit per worker"),
    ("--pids", "pids", 1, "cgroup limit on processes and threads per worker"),
    ("--cpu-cores", "cpu_cores", 1, "cgroup CPU quota per worker, in cores (0: none)"),
    ("--cpu-seconds", "cpu_seconds", 1, "CPU seconds a worker may use over its life (RLIMIT_CPU)"),
    ("--address-space-mib", "address_space_bytes", MIB, "RLIMIT_AS per worker"),
    ("--open-files", "open_files", 1, "RLIMIT_NOFILE per worker"),
    ("--processes", "processes", 1, "RLIMIT_NPROC for the worker's uid"),
    ("--file-size-mib", "file_size_bytes", MIB, "largest file a worker may write (RLIMIT_FSIZE)"),
    ("--tmp-mib", "tmp_bytes", MIB, "size of the worker's private /tmp"),
)


def _layers(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layer {unknown[0]!r}; known: {', '.join(LAYERS)}")
    return names


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sandbox", "limits of each worker and the layers it may lack")
    group.add_argument(
        "--profile", choices=tuple(PROFILES), default="host",
        help="where the runner runs: host (as root, it applies every layer) or pod (unprivileged in a "
        "Kubernetes Pod, which provides the cgroup, namespaces, filesystem and uid layers instead)",
    )
    for flag, name, unit, text in _LIMIT_FLAGS:
        kind = float if name == "cpu_cores" else int
        group.add_argument(flag, type=kind, default=None, help=f"{text} (default {getattr(_DEFAULTS, name) / unit:g})")
    group.add_argument(
        "--allow-missing-layer", type=_layers, action="append", default=[], metavar="NAME[,NAME]",
        help=f"start even if this sandbox layer is missing (logged); one of {', '.join(LAYERS)}",
    )
    group.add_argument(
        "--worker-template", choices=("on", "off"), default=None,
        help="fork workers from a pre-imported, secret-free template process that applies no layer itself "
        f"(each worker still applies every layer), or start each as a fresh interpreter "
        f"(default: ${WORKER_TEMPLATE_ENV}, else on)",
    )


def limits_from(args: argparse.Namespace) -> WorkerLimits:
    values = {}
    for flag, name, unit, _text in _LIMIT_FLAGS:
        given = getattr(args, flag.lstrip("-").replace("-", "_"))
        if given is not None:
            values[name] = given if name == "cpu_cores" else int(given) * unit
    return WorkerLimits(**values)


def worker_template_from(args: argparse.Namespace) -> bool:
    return (args.worker_template or os.environ.get(WORKER_TEMPLATE_ENV) or "on") != "off"


def policy_from(args: argparse.Namespace) -> SandboxPolicy:
    allowed = [name for group in args.allow_missing_layer for name in group]
    from_env = os.environ.get(ALLOW_MISSING_ENV, "")
    if from_env:
        allowed += _layers(from_env)
    allowed = tuple(dict.fromkeys(allowed))
    for name in allowed:
        log.warning("sandbox layer %s may be missing: explicitly allowed by the operator", name)
    return SandboxPolicy(allow_missing=allowed, profile=args.profile)


def format_report(layers: list[LayerResult], policy: SandboxPolicy) -> str:
    width = max(len(name) for name in LAYERS)
    profile = "" if policy.profile == "host" else f", profile {policy.profile}"
    lines = [f"Sandbox layers for a worker on this machine ({platform.system()} {platform.release()}, "
             f"runner uid {os.getuid()}{profile}), in the order they are applied:"]
    for layer in layers:
        lines.append(f"  [{policy.state(layer):<7}] {layer.name:<{width}}  {layer.detail}")
    provided = [name for name in LAYERS if policy.provided_by(name)]
    missing = [layer.name for layer in layers if not layer.active and not policy.provided_by(layer.name)]
    blocking = [name for name in missing if policy.required(name)]
    if not missing and provided:
        lines.append(f"Every layer the runner must apply is active: a runner here starts with --profile {policy.profile}.")
    elif not missing:
        lines.append("All layers are active: a runner here starts with the default (all layers required).")
    elif blocking:
        lines.append(f"A runner here refuses to start unless given --allow-missing-layer {','.join(blocking)}.")
    else:
        lines.append("Missing layers are allowed by this command line: a runner with it starts (and logs them).")
    if provided:
        lines.append("The Pod must provide (its securityContext, NetworkPolicy and per-Pod cgroup), "
                     "whether or not the runner could apply them too:")
        lines += [f"  {name:<{width}}  {policy.provided_by(name)}" for name in provided]
        lines.append(POD_SHARING)
    return "\n".join(lines)
