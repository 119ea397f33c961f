"""Find the model class in a submission: the dynamic subclass pattern.

The coordinator names a base class (`package.module.ClassName`) that must be
importable in the worker. The submission folder is imported, and exactly one
concrete class *defined in the folder* must subclass the base class; classes
imported from elsewhere do not count. Only the public methods the base class
declares are callable (`secure_runner.allowlist`). The base class is imported
before the submission's folder is on sys.path, and that folder comes after the
standard library, the installed packages and the base paths: a submission can
shadow none of them. Runs inside the worker; errors are SetupError with a code.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from types import ModuleType

from secure_runner.errors import ErrorCode, SetupError

MAX_ERROR_CHARS = 500


def describe_exception(exc: BaseException) -> str:
    """One line for the wire: type and message, never a traceback."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def import_base_class(base_classname: str) -> type:
    module_name, _, class_name = base_classname.rpartition(".")
    if not module_name or not class_name:
        raise SetupError(ErrorCode.SETUP_BASE_CLASS, f"base class {base_classname!r} must be module.ClassName")
    try:
        base = getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:  # any import-time failure of trusted code is still a setup error
        raise SetupError(ErrorCode.SETUP_BASE_CLASS, f"cannot import {base_classname}: {describe_exception(exc)}") from None
    if not inspect.isclass(base):
        raise SetupError(ErrorCode.SETUP_BASE_CLASS, f"{base_classname} is not a class")
    return base


def check_trusted_origin(module_names: list[str], trusted: list[Path], submission: Path) -> None:
    """Each loaded module named (or inside a package named) is a file under a trusted root, never the submission's.

    Run before the submission's folder is on sys.path, this shows the base class and the
    project's package came from the Python installation or the base paths; a module of
    them found in the submission folder (a base path that contains it, say) is refused.
    """
    roots = [root.resolve() for root in trusted]
    submission = submission.resolve()
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] not in module_names:
            continue
        file = getattr(module, "__file__", None)
        if file is None:  # a namespace package: only its modules have files
            continue
        path = Path(file).resolve()
        if path.is_relative_to(submission) or not any(path.is_relative_to(root) for root in roots):
            raise SetupError(ErrorCode.SETUP_BASE_CLASS, f"module {name} was not loaded from a trusted path")


def _submission_modules(folder: Path) -> list[ModuleType]:
    names = sorted(
        {p.stem for p in folder.glob("*.py")} | {p.parent.name for p in folder.glob("*/__init__.py")}
    )
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - untrusted code may raise anything, SystemExit included
            raise SetupError(ErrorCode.SETUP_IMPORT_FAILED, f"importing {name}: {describe_exception(exc)}") from None
    return [
        module
        for module in list(sys.modules.values())
        if (file := getattr(module, "__file__", None)) and Path(file).resolve().is_relative_to(folder)
    ]


def find_model_class(folder: Path, base: type) -> type:
    """The one concrete subclass of `base` defined in `folder`'s modules."""
    folder = folder.resolve()
    candidates = {
        obj
        for module in _submission_modules(folder)
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and obj.__module__ == module.__name__
        and issubclass(obj, base)
        and obj is not base
        and not inspect.isabstract(obj)
    }
    if not candidates:
        raise SetupError(
            ErrorCode.SETUP_NO_CANDIDATE,
            f"no class defined in the submission subclasses {base.__module__}.{base.__qualname__}",
        )
    if len(candidates) > 1:
        names = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in candidates))
        raise SetupError(
            ErrorCode.SETUP_MANY_CANDIDATES,
            f"several classes subclass {base.__qualname__}: {names}; keep exactly one",
        )
    return candidates.pop()
