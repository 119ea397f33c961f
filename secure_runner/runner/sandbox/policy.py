"""What a runner asks of each worker's sandbox: limits and required layers.

Both dataclasses travel to the worker as JSON inside its config, so they hold
plain values only. Every layer is required by default: a worker that cannot
apply a required layer refuses to load code, and a runner refuses to start.
`allow_missing` is the explicit, logged opt-out, layer by layer.
A profile (`PROFILES`) says where the runner runs, and so which layers something
outside the runner provides instead: the only place its meaning is defined.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# In the order the worker applies them (DESIGN.md section 4).
LAYERS = (
    "environment",   # clean env, no inherited descriptors, new session (set up by the runner, verified here)
    "cgroup",        # memory, pids (and cpu quota and equal weight where the cpu controller is present)
    "rlimits",       # CPU seconds, address space, open files, processes, file size, core 0
    "namespaces",    # PID (the worker forks to become pid 1), network (only its own lo), IPC, UTS, mount, cgroup
    "filesystem",    # new root: read-only binds of what Python needs, the submission, base paths; private /tmp, masked /proc
    "uid",           # a per-worker unprivileged uid/gid, no supplementary groups, empty capability bounding set
    "no_new_privs",  # setuid/file capabilities give nothing
    "landlock",      # read-only allowlist, writable /tmp, no TCP, no abstract sockets or signals outside
    "seccomp",       # deny-list: ptrace, mount, namespaces, kernel keyring, bpf, inotify, all but socket pairs, ...
)

# Where a runner runs -> the layers it cannot apply there and what stands in for each (README,
# "Deploying on Kubernetes"; SECURITY.md, "Kubernetes deployment"). "host": a runner started as
# root applies every layer itself. "pod": a runner in a Pod of the Kubernetes backend is
# unprivileged (non-root, no capabilities, no privilege escalation), so the four layers needing
# privileges are the Pod's to provide; the other five the runner still applies and requires.
PROFILES: dict[str, dict[str, str]] = {
    "host": {},
    "pod": {
        "cgroup": "the Pod's cgroup: its resources.limits (memory, CPU), and the kubelet's podPidsLimit where set",
        "namespaces": "the Pod's own PID, IPC, UTS and mount namespaces, its network namespace "
                      "with a NetworkPolicy denying all egress",
        "filesystem": "the container's read-only root filesystem, with emptyDir /tmp",
        "uid": "the Pod's securityContext: non-root runAsUser, all capabilities dropped, no privilege escalation",
    },
}
# Why several models in one Pod are less separated than on a host (the pod profile's cost).
POD_SHARING = (
    "Workers of one Pod share its uid (one RLIMIT_NPROC budget), its PID namespace (each sees the "
    "others' processes) and its cgroup (one memory and CPU limit): between models only Landlock and "
    "seccomp separate them, so the Kubernetes backend runs one model per Pod by default."
)


@dataclass(frozen=True)
class WorkerLimits:
    """Resource limits of one worker (rlimits and cgroup); every value is per worker."""

    address_space_bytes: int = 8 << 30  # RLIMIT_AS: generous, tight values break OpenBLAS
    open_files: int = 256
    file_size_bytes: int = 64 << 20
    core_bytes: int = 0
    cpu_seconds: int = 3600  # RLIMIT_CPU over the worker's life: SIGXCPU, then SIGKILL one second later
    processes: int = 64  # RLIMIT_NPROC, counted for the worker's own uid (threads included)
    memory_bytes: int = 2 << 30  # cgroup memory limit (no swap); the kernel's OOM killer enforces it
    pids: int = 64  # cgroup pids limit (processes and threads)
    cpu_cores: float = 1.0  # cgroup CPU quota in cores; 0 leaves CPU time unthrottled
    tmp_bytes: int = 256 << 20  # size of the private /tmp (a tmpfs, charged to the memory limit)


@dataclass(frozen=True)
class SandboxPolicy:
    """Which layers may be missing, the uid range workers run as, and the profile."""

    allow_missing: tuple[str, ...] = ()
    # A worker runs as uid = gid = uid_base + its pid: unique among live workers on the host, so
    # workers never share a uid (no signals, ptrace or RLIMIT_NPROC budget between models).
    uid_base: int = 1_000_000_000
    check_only: bool = field(default=False, repr=False)  # sandbox-check: apply, probe, report, exit
    profile: str = "host"  # a key of PROFILES

    def __post_init__(self) -> None:
        unknown = sorted(set(self.allow_missing) - set(LAYERS))
        if unknown:
            raise ValueError(f"unknown sandbox layer(s) {', '.join(unknown)}; known: {', '.join(LAYERS)}")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown sandbox profile {self.profile!r}; known: {', '.join(PROFILES)}")

    def provided_by(self, layer: str) -> str:
        """What stands in for this layer in the profile, or "" when the runner must apply it."""
        return PROFILES[self.profile].get(layer, "")

    def required(self, layer: str) -> bool:
        return layer not in self.allow_missing and not self.provided_by(layer)

    def state(self, layer: LayerResult) -> str:
        """The layer's label in sandbox-check's report: a layer the Pod provides is never "active" unless applied."""
        if layer.active:
            return "active"
        return "by Pod" if self.provided_by(layer.name) else "MISSING"

    def refusal(self, layers: list[LayerResult]) -> str:
        """Why a worker must not load code, or "" when every required layer is in force."""
        seen = {layer.name for layer in layers}
        missing = [f"{r.name} ({r.detail})" for r in layers if not r.active and self.required(r.name)]
        missing += [f"{name} (not reported)" for name in LAYERS if name not in seen and self.required(name)]
        return "required sandbox layer missing: " + "; ".join(missing) if missing else ""


def scratch_dir(worker_pid: int) -> str:
    """A worker's private temp dir when the filesystem layer is missing: made by the worker
    (whose environment is clean, so always under /tmp), removed by the runner after it exits."""
    return f"/tmp/secure-runner-worker-{worker_pid}"


@dataclass(frozen=True)
class LayerResult:
    name: str
    active: bool
    detail: str
