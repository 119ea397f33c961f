"""Base class of the test game. Only these public methods are callable remotely."""


class GameBase:
    def echo(self, value):
        raise NotImplementedError

    def count(self) -> int:
        """How many calls (other than count) this instance has seen."""
        raise NotImplementedError

    def hang(self, seconds: float) -> None:
        raise NotImplementedError

    def fail(self, message: str) -> None:
        raise NotImplementedError


class ReferenceGame(GameBase):
    """A concrete subclass that lives outside any submission: importing it must not make it a candidate."""

    def echo(self, value):
        return value

    def count(self) -> int:
        return 0

    def hang(self, seconds: float) -> None:
        pass

    def fail(self, message: str) -> None:
        raise RuntimeError(message)
