"""Two concrete subclasses: the runner cannot guess which one is meant."""

from sr_testgame.base import GameBase


class First(GameBase):
    def echo(self, value):
        return 1

    def count(self) -> int:
        return 0

    def hang(self, seconds: float) -> None:
        pass

    def fail(self, message: str) -> None:
        pass


class Second(First):
    pass
