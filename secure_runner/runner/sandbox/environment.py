"""Layer 1: a clean environment, no inherited descriptors, a new session.

The runner sets these up when it starts the worker (`python -I`, a fixed
environment, `close_fds`, `start_new_session`); the worker verifies them here
before anything else, so a runner bug cannot silently hand a worker a secret.
"""

from __future__ import annotations

import os

# Variables a worker may inherit: none carries a secret. Everything else is dropped.
PASSED_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
WORKER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    # BLAS libraries size their thread pools from these; the pids limit counts threads.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# Set by the worker itself when its scratch folder is not /tmp (no filesystem layer).
SANDBOX_ENV = ("HOME", "TMPDIR")


def worker_environment(source: dict[str, str]) -> dict[str, str]:
    return WORKER_ENV | {k: source[k] for k in PASSED_ENV if k in source}


def open_descriptors() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue  # the listing's own descriptor, closed by now
        fds.add(int(name))
    return fds


def verify(protocol_fds: tuple[int, int], leader_outside: bool = False) -> str:
    """`leader_outside`: in its PID namespace, the session's leader (the waiter) is outside, seen as pid 0."""
    extra = sorted(set(os.environ) - set(WORKER_ENV) - set(PASSED_ENV) - set(SANDBOX_ENV) - {"LC_CTYPE"})
    if extra:
        raise OSError(f"unexpected environment variables: {', '.join(extra)}")
    fds = open_descriptors() - {0, 1, 2, *protocol_fds}
    if fds:
        raise OSError(f"inherited descriptors: {sorted(fds)}")
    if os.getsid(0) != (0 if leader_outside else os.getpid()):
        raise OSError("not in the session the runner made for it")
    return f"{len(os.environ)} fixed variables, descriptors 0-2 and the protocol pipes only, own session"


def point_at_scratch(tmp: str) -> None:
    """With the filesystem layer /tmp is private and /etc/passwd names it as home: nothing to set."""
    if tmp != "/tmp":
        os.environ.update(HOME=tmp, TMPDIR=tmp)
