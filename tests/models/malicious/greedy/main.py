"""A malicious submission that answers more than the runner lets a model answer.

It replaces the codec's encoder inside its worker, so `echo("huge")` goes out
as a 40 MiB BYTES value: over the 16 MiB output cap, under the worker frame cap
the runner used to apply. Any other value is echoed as usual.
"""

import secure_runner.codec
from secure_runner.v1 import values_pb2
from sr_testgame.base import GameBase

HUGE_BYTES = 40 * 1024 * 1024
_encode = secure_runner.codec.to_variant


def _unlimited(value, **kwargs):
    if value == "huge":
        return values_pb2.Variant(type=values_pb2.VariantType.BYTES, value=b"x" * HUGE_BYTES)
    return _encode(value, **kwargs)


secure_runner.codec.to_variant = _unlimited


class Greedy(GameBase):
    def echo(self, value):
        return value
