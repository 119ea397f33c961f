"""A noisy neighbour: `echo(seconds)` keeps every CPU of the host busy for that long.

It spins in as many threads as the host has CPUs (plus its main thread), so
its worker wants the whole machine while it runs. `echo(0)` answers at once.
"""

import os
import threading
import time

from sr_testgame.base import GameBase


def _spin(until):
    while time.monotonic() < until:
        pass


class Spinner(GameBase):
    def echo(self, seconds):
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=_spin, args=(until,), daemon=True) for _ in range(os.cpu_count() or 1)]
        for thread in threads:
            thread.start()
        _spin(until)
        return seconds
