"""The trivial base class the reference runner resolves (`refbench.base.EchoBase`).

Same shape as our own test game: one method, `echo(prices)`, which a submission implements.
"""


class EchoBase:
    def echo(self, prices):
        raise NotImplementedError
