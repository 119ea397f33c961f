"""A well-behaved model: forecasts with the mean of the last prices it saw."""

from demo_game.tracker import TrackerBase


class MovingAverage(TrackerBase):
    def __init__(self, window: int = 5) -> None:
        self.window = window
        self.prices: list[float] = []

    def tick(self, prices: list[float]) -> None:
        self.prices = (self.prices + list(prices))[-self.window :]

    def predict(self, horizon: int) -> float:
        return round(sum(self.prices) / len(self.prices), 4) if self.prices else 0.0
