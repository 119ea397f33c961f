"""A model with a bug: it raises on every call."""

from demo_game.tracker import TrackerBase


class Buggy(TrackerBase):
    def tick(self, prices: list[float]) -> None:
        raise ValueError("prices must be sorted")

    def predict(self, horizon: int) -> float:
        return 1 / 0
