"""Worker side: apply the sandbox layer by layer before any submission code loads.

`apply` runs in the worker bootstrap (a fresh `python -I` process, still root,
single-threaded) and returns one `LayerResult` per layer of `policy.LAYERS`.
The namespaces layer forks: the layers after it, and `apply`'s return, happen
in the child (pid 1 of the new PID namespace); the process the runner started
only waits for it there (see `namespaces`). `Plan.host_pid` keeps the pid the
runner knows, for the worker's uid and scratch folder.
A layer that cannot be applied is reported with the reason; if it is
required, the worker refuses to load code (`SandboxPolicy.refusal`). Each layer has
its own module; none imports grpc, smp, transport or anything holding a key.
Only the worker imports this module (see the package docstring for the runner's side).

The bindings are imported here, before the filesystem layer replaces the root
and Landlock locks reads down.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from secure_runner.runner.sandbox import cgroups, environment, filesystem, identity, limits, namespaces
from secure_runner.runner.sandbox.policy import LayerResult, SandboxPolicy, WorkerLimits, scratch_dir

try:  # optional at import time: a missing binding is a missing layer, reported like any other
    from secure_runner.runner.sandbox import landlock
except Exception as exc:  # noqa: BLE001 - ImportError, or OSError from a library that cannot load
    landlock, _LANDLOCK_ERROR = None, f"landlockpy unavailable: {exc}"
try:
    from secure_runner.runner.sandbox import seccomp
except Exception as exc:  # noqa: BLE001
    seccomp, _SECCOMP_ERROR = None, f"pyseccomp/libseccomp unavailable: {exc}"


@dataclass
class Plan:
    """What the worker needs to build its sandbox (from its config)."""

    submission: str
    base_paths: list[str]
    limits: WorkerLimits
    policy: SandboxPolicy
    cgroup_procs: list[str]
    cgroup_error: str
    protocol_fds: tuple[int, int]
    host_pid: int = field(init=False)  # the pid the runner knows (the waiter's, once the PID namespace exists)
    waiter: bool = field(init=False)  # will a waiter stay outside the PID namespace (not so for a worker born pid 1)?
    uid: int = field(init=False)
    tmp: str = "/tmp"
    read_only: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.host_pid = namespaces.pid_outside()
        self.waiter = not namespaces.started_as_pid_one()
        self.uid = identity.worker_uid(self.policy.uid_base, self.host_pid)
        self.read_only = filesystem.minimal([*filesystem.python_paths(), self.submission, *self.base_paths])


def _scratch(plan: Plan) -> str:
    """Without the filesystem layer: a private temp dir on the host (the runner removes it)."""
    path = scratch_dir(plan.host_pid)
    os.mkdir(path, 0o700)
    with contextlib.suppress(OSError):  # without the right to chown, the uid layer fails too
        os.chown(path, plan.uid, plan.uid)
    return path


def _steps(plan: Plan, done: Callable[[str], bool]) -> list[tuple[str, Callable[[], str]]]:
    def needs(layer: str, step: Callable[[], str]) -> Callable[[], str]:
        def run() -> str:
            if not done(layer):
                raise OSError(f"needs the {layer} layer")
            return step()
        return run

    def filesystem_step() -> str:
        return filesystem.apply(plan.read_only, plan.limits.tmp_bytes, plan.uid, plan.limits.memory_bytes)

    def uid_step() -> str:
        detail = identity.drop_uid(plan.uid, plan.read_only, done("filesystem"))
        if done("namespaces"):
            namespaces.die_with_the_waiter()  # changing credentials cleared the parent-death signal
        return detail

    def landlock_step() -> str:
        if landlock is None:
            raise OSError(_LANDLOCK_ERROR)
        return landlock.apply([*filesystem.system_paths(), *plan.read_only], plan.tmp)

    def seccomp_step() -> str:
        if seccomp is None:
            raise OSError(_SECCOMP_ERROR)
        return seccomp.apply()

    return [
        ("environment", lambda: environment.verify(plan.protocol_fds)),
        ("cgroup", lambda: cgroups.join(plan.cgroup_procs, plan.limits, plan.cgroup_error)),
        ("rlimits", lambda: limits.apply(plan.limits)),
        ("namespaces", namespaces.apply),
        ("filesystem", needs("namespaces", filesystem_step)),
        ("uid", uid_step),
        ("no_new_privs", identity.no_new_privs),
        ("landlock", needs("no_new_privs", landlock_step)),
        ("seccomp", seccomp_step),
    ]


def _reason(exc: OSError) -> str:
    if exc.errno and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc)


def apply(plan: Plan) -> list[LayerResult]:
    """Apply every layer in order; never raises for a layer that cannot be applied."""
    if threading.active_count() != 1:
        raise RuntimeError("the sandbox must be applied while the worker is single-threaded")
    results: list[LayerResult] = []

    def done(name: str) -> bool:
        return any(r.name == name and r.active for r in results)

    for name, step in _steps(plan, done):
        if name == "uid" and not done("filesystem"):
            plan.tmp = _scratch(plan)
        try:
            results.append(LayerResult(name, True, step()))
        except OSError as exc:
            results.append(LayerResult(name, False, _reason(exc)))
        except Exception as exc:  # noqa: BLE001 - a layer that breaks is a missing layer, reported
            results.append(LayerResult(name, False, f"{type(exc).__name__}: {exc}"))
    environment.point_at_scratch(plan.tmp)
    os.chdir(plan.submission)
    return results


def verify(plan: Plan, layers: list[LayerResult]) -> list[LayerResult]:
    """sandbox-check: test from inside that each active layer really holds."""
    leader_outside = plan.waiter and any(r.name == "namespaces" and r.active for r in layers)
    checks: dict[str, Callable[[], str]] = {
        "environment": lambda: environment.verify(plan.protocol_fds, leader_outside) and "still clean after every layer",
        "cgroup": lambda: "the runner found the worker in it",
        "rlimits": lambda: limits.verify(plan.limits),
        "namespaces": namespaces.verify,
        "filesystem": lambda: filesystem.verify(plan.submission),
        "uid": identity.verify_uid,
        "no_new_privs": identity.verify_no_new_privs,
        "landlock": lambda: landlock.verify(plan.read_only),
        "seccomp": lambda: seccomp.verify(),
    }
    verified = []
    for layer in layers:
        if not layer.active:
            verified.append(layer)
            continue
        try:
            verified.append(LayerResult(layer.name, True, f"{layer.detail} [verified: {checks[layer.name]()}]"))
        except OSError as exc:
            verified.append(LayerResult(layer.name, False, f"applied but does not hold: {exc}"))
    return verified
