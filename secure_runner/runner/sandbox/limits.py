"""Layer 3: rlimits, a fallback for the cgroup and the only per-process CPU budget.

RLIMIT_CPU sends SIGXCPU at the soft limit and SIGKILL at the hard limit one
second later, so a model that ignores SIGXCPU still dies. RLIMIT_NPROC counts
the worker's own uid (unique per worker), so it only bounds this worker.
"""

from __future__ import annotations

import resource

from secure_runner.runner.sandbox.policy import WorkerLimits

CPU_GRACE_SECONDS = 1


def rlimit_table(limits: WorkerLimits) -> list[tuple[str, int, int, int]]:
    return [
        ("RLIMIT_CPU", resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + CPU_GRACE_SECONDS),
        ("RLIMIT_AS", resource.RLIMIT_AS, limits.address_space_bytes, limits.address_space_bytes),
        ("RLIMIT_NOFILE", resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        ("RLIMIT_NPROC", resource.RLIMIT_NPROC, limits.processes, limits.processes),
        ("RLIMIT_FSIZE", resource.RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes),
        ("RLIMIT_CORE", resource.RLIMIT_CORE, limits.core_bytes, limits.core_bytes),
    ]


def apply(limits: WorkerLimits) -> str:
    for _name, which, soft, hard in rlimit_table(limits):
        resource.setrlimit(which, (soft, hard))
    return (
        f"cpu {limits.cpu_seconds} s, address space {limits.address_space_bytes >> 20} MiB, "
        f"{limits.open_files} files, {limits.processes} processes, file size {limits.file_size_bytes >> 20} MiB, no core"
    )


def verify(limits: WorkerLimits) -> str:
    wrong = [name for name, which, soft, hard in rlimit_table(limits) if resource.getrlimit(which) != (soft, hard)]
    if wrong:
        raise OSError(f"rlimits not in force: {', '.join(wrong)}")
    return "all six rlimits in force"
