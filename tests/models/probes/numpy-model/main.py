"""A benign submission using numpy, threads, asyncio, a multiprocessing pipe (a socket pair) and its
temp folder: all must work in the sandbox."""

import asyncio
import multiprocessing
import tempfile
import threading

import numpy as np

from sr_testgame.base import GameBase


class LinearModel(GameBase):
    def __init__(self):
        self.calls = 0

    def echo(self, value):
        self.calls += 1
        matrix = np.array(value["matrix"], dtype=np.float64)
        vector = np.array(value["vector"], dtype=np.float64)
        solved = np.linalg.solve(matrix, vector)
        receiving, sending = multiprocessing.Pipe()
        worker = threading.Thread(target=lambda: sending.send(float(np.dot(vector, vector))))
        worker.start()
        worker.join()
        results = [receiving.recv()]
        with tempfile.NamedTemporaryFile() as scratch:
            np.save(scratch, solved)
            scratch.seek(0)
            reloaded = np.load(scratch)
        loop = asyncio.new_event_loop()
        try:
            doubled = loop.run_until_complete(self._double(reloaded))
        finally:
            loop.close()
        # One array back: the solution, |vector|^2 (from the thread), the eigenvalues of M M^T.
        return np.concatenate([doubled / 2, [results[0]], np.linalg.eigvalsh(matrix @ matrix.T)])

    async def _double(self, array):
        await asyncio.sleep(0)
        return array * 2

    def count(self):
        return self.calls

    def hang(self, seconds):
        pass

    def fail(self, message):
        raise RuntimeError(message)
