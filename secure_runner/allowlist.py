"""Which methods of a model may be called remotely: the base class's public methods, nothing else.

One rule, used by three parties that each apply it with their own trusted code:
the worker (before any submission code is on its sys.path), the runner (on the
names the worker reported, so a report can only narrow the set) and the client
(on the base class it imports itself, or on what runners report, narrowed
likewise). Pure: no I/O, no import of anything but the standard library, so the
worker may import it.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Iterable


def is_callable_name(name: object) -> bool:
    """A name that could ever be called remotely: a public identifier (never a dunder or private name)."""
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_")


def declared_methods(base: type) -> frozenset[str]:
    """Public methods declared by `base` or its bases (`object` excluded): the callable allowlist.

    Reads the classes' own `__dict__`s, so nothing a subclass adds counts.
    """
    names = set()
    for klass in base.__mro__[:-1]:  # everything but `object`
        for name, value in vars(klass).items():
            if is_callable_name(name) and (inspect.isfunction(value) or isinstance(value, staticmethod | classmethod)):
                names.add(name)
    return frozenset(names)


def narrowed(allowed: frozenset[str] | None, reported: Iterable[str]) -> frozenset[str]:
    """`reported` (an untrusted list) kept to callable names and, once `allowed` is known, within it."""
    names = frozenset(name for name in reported if is_callable_name(name))
    return names if allowed is None else allowed & names
