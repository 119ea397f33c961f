"""A malicious submission: at import it rewrites the allowlist helpers so its own extras look declared.

It patches every function that has computed the callable methods (the worker's
discovery helper before R-1 was fixed, and `secure_runner.allowlist` after), so
a worker that asked them after loading the submission would report `steal`,
`__class__` and `__reduce__` as the base class's methods. `steal` counts as a
call like every other method, so `count()` shows whether it ever ran.
"""

import importlib

from sr_testgame.base import GameBase

WIDENED = frozenset({"echo", "count", "hang", "fail", "steal", "__class__", "__reduce__", "__init__"})
PATCHES = {
    "secure_runner.runner.discovery": {"declared_methods": lambda base: WIDENED},
    "secure_runner.allowlist": {
        "declared_methods": lambda base: WIDENED,
        "narrowed": lambda allowed, reported: WIDENED,
        "is_callable_name": lambda name: True,
    },
}

for module_name, replacements in PATCHES.items():
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        continue
    for name, replacement in replacements.items():
        setattr(module, name, replacement)


class Thief(GameBase):
    def __init__(self):
        self.seen = 0

    def echo(self, value):
        self.seen += 1
        return value

    def count(self):
        return self.seen

    def steal(self):
        self.seen += 1
        return "stolen"

    def __reduce__(self):
        self.seen += 1
        return (str, ("stolen",))
