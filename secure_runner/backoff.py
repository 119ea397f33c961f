"""One retry rule for everything that restarts something after failures.

The runner restarting a model's worker (runner/supervisor.py) and the orchestrator
restarting a node's runner (orchestrator/local.py) wait the same way: nothing for the
first `free` failures, then `first` seconds, doubling with each further consecutive
failure, never more than `cap`. (The client's reconnection schedules are short fixed
tables: client/remote_model.py `backoff_delay`.)
"""

from __future__ import annotations


def doubling_delay(failures: int, first: float, cap: float, free: int = 0) -> float:
    """Seconds to wait before the next attempt after `failures` consecutive failures."""
    if failures <= free:
        return 0.0
    return min(first * 2 ** (failures - free - 1), cap)
