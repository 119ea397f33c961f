"""Tie a child process's life to its parent's (Linux PR_SET_PDEATHSIG).

Used by runners started with `--exit-with-parent` (tests, benchmarks, a runner run by
hand under a supervisor that wants it gone with itself), so they never outlive the
process that started them, even when it is killed with SIGKILL and cannot clean up.
The embedded orchestrator does not use it: its runners outlive it on purpose and are
adopted by the next orchestrator (orchestrator/processes.py).
"""

from __future__ import annotations

import os
import signal

from secure_runner.runner.sandbox import syscalls


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
