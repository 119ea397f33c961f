"""A fake base-class module: its GameBase declares `steal` too."""


class GameBase:
    def echo(self, value):
        raise NotImplementedError

    def count(self):
        raise NotImplementedError

    def hang(self, seconds):
        raise NotImplementedError

    def fail(self, message):
        raise NotImplementedError

    def steal(self):
        raise NotImplementedError
