"""The base class crunchers implement. Only the methods declared here can be called remotely."""


class TrackerBase:
    def tick(self, prices: list[float]) -> None:
        """Receive the latest prices."""
        raise NotImplementedError

    def predict(self, horizon: int) -> float:
        """Forecast the price `horizon` steps ahead."""
        raise NotImplementedError
