"""The embedded registry: a local JSON file, re-read when it changes.

`current()` is called on every authenticated call; it stats the file at most
once per `check_interval` seconds and re-parses it only when its size or
modification time changed, so new and revoked keys take effect within that
interval without a restart. A file that fails to parse is logged and the last
good registry stays in force (a half-written file must not lock everyone out).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.smp.registry import Registry

log = logging.getLogger(__name__)


class RegistryFile:
    def __init__(self, path: Path, check_interval: float = 1.0) -> None:
        self.path = path
        self._check_interval = check_interval
        self._stamp, self._registry = self._load()
        self._next_check = time.monotonic() + check_interval

    def _load(self) -> tuple[tuple[int, int], Registry]:
        try:
            stat = os.stat(self.path)
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(ErrorCode.REGISTRY_INVALID, f"cannot read registry {self.path}: {exc}") from None
        return (stat.st_mtime_ns, stat.st_size), Registry.from_json(data)

    def current(self) -> Registry:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._check_interval
            try:
                stat = os.stat(self.path)
                if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                    self._stamp, self._registry = self._load()
                    log.info("registry %s reloaded", self.path)
            except (OSError, ConfigError) as exc:
                log.error("keeping the previous registry: %s", exc)
        return self._registry
