"""The compute benchmark's model: burns a fixed amount of CPU per call, then echoes its input.

The same file runs in this project's workers and in the reference runner (base class
`refbench.base.EchoBase`, benchmarks/reference_model/base). The burn is a tight numeric loop,
never a sleep. Its length is the number in the `iterations` file beside this one, which
benchmarks/compute.py calibrates once at start (to ~2 ms of CPU) and writes into its copy of
this folder: every model of both projects then does exactly the same work.
"""

from pathlib import Path

from refbench.base import EchoBase

ITERATIONS = int((Path(__file__).parent / "iterations").read_text())


def burn(iterations: int) -> float:
    """A loop of float arithmetic the interpreter cannot skip; returns its result so it is used."""
    total = 0.0
    for i in range(iterations):
        total += (i * 1.000001) % 7.0
    return total


class ComputeModel(EchoBase):
    def echo(self, prices):
        burn(ITERATIONS)
        return prices
