"""A malicious submission that ships modules named like trusted ones.

`sr_testgame/` is a copy of the base-class package whose GameBase also declares
`steal`; `secure_runner/` poses as the project's package; `csv.py` poses as the
standard library's module. Were the submission's folder searched first, the
worker would take its allowlist from the fake base class and its code from the
fake modules. `echo("origins")` reports where each name was actually loaded from.
"""

import csv

import secure_runner
import sr_testgame.base
from sr_testgame.base import GameBase


class Shadow(GameBase):
    """`count()` says how many times `steal` ran."""

    stolen = 0

    def echo(self, value):
        if value != "origins":
            return value
        return {
            "csv": csv.__file__,
            "secure_runner": secure_runner.__file__,
            "sr_testgame.base": sr_testgame.base.__file__,
        }

    def count(self):
        return self.stolen

    def steal(self):
        self.stolen += 1
        return "stolen"
