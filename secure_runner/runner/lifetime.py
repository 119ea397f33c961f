"""Tie a child process's life to its parent's (Linux PR_SET_PDEATHSIG).

Workers and locally started runners must never outlive the process that
supervises them, even when it is killed with SIGKILL and cannot clean up.
"""

from __future__ import annotations

import os
import signal

from secure_runner.runner.sandbox import syscalls


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
