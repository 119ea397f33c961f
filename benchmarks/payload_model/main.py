"""The payload benchmark's model: reads every value it is given and returns a small summary.

The same file runs in this project's workers and in the reference runner (base class
`refbench.base.EchoBase`, benchmarks/reference_model/base). A data frame arrives as a pandas
DataFrame, an NDARRAY as a numpy array, JSON as a list of floats.
"""

from refbench.base import EchoBase


class SummaryModel(EchoBase):
    def echo(self, value):
        if hasattr(value, "to_numpy"):  # a DataFrame: every cell, as the model would use them
            value = value.to_numpy()
        total = float(value.sum()) if hasattr(value, "sum") else float(sum(value))
        return {"n": len(value), "sum": total}
