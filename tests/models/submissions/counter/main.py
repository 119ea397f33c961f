"""A stateful test model: counts every call it receives, so tests can prove it saw none."""

import time

from sr_testgame.base import GameBase


class Counter(GameBase):
    def __init__(self, start: int = 0) -> None:
        self.seen = start

    def echo(self, value):
        self.seen += 1
        return value

    def count(self) -> int:
        return self.seen

    def hang(self, seconds: float) -> None:
        self.seen += 1
        time.sleep(seconds)

    def fail(self, message: str) -> None:
        self.seen += 1
        raise RuntimeError(message)

    def secret_method(self) -> str:
        """Not declared by the base class: must never be callable."""
        self.seen += 1
        return "leaked"
