"""A model that takes far too long: every call outlives the coordinator's timeout."""

import time

from demo_game.tracker import TrackerBase


class Sleepy(TrackerBase):
    def tick(self, prices: list[float]) -> None:
        time.sleep(30)

    def predict(self, horizon: int) -> float:
        time.sleep(30)
        return 0.0
