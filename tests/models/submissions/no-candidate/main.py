"""Imports a concrete subclass from elsewhere and defines an unrelated class: no candidate."""

from sr_testgame.base import ReferenceGame  # noqa: F401 - imported classes must not count


class NotAModel:
    def echo(self, value):
        return value
