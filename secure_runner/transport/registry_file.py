"""The embedded registry source: a local JSON file, re-read when it changes.

`current()` is called on every authenticated call; it stats the file at most
once per `check_interval` seconds and re-parses it only when its size or
modification time changed, so new and revoked keys take effect within that
interval without a restart. It returns a `RegistrySnapshot` whose `fetched_at`
is the last time the file was read, or seen unchanged, successfully.

A file that cannot be read or parsed (half-written, ambiguous, deleted) keeps the
last good registry in force, so one bad edit does not lock everyone out, but it
is never silent: the failure is logged and reported once per failed version to
`on_failure` (the services write an audit line and turn their health to
NOT_SERVING), `healthy` turns False, and the snapshot's `fetched_at` stops
advancing, so after the verifier's maximum staleness every call is refused
(REGISTRY_STALE, decided by `smp.rules`). Only `ConfigError` leaves `current()`.

`open_registry_source` is the one place the services (runner, orchestrator, client) build
their registry source: this file, or the chain adapter (`registry.chain`, optional `chain`
extra) when given its configuration. Both are used the same way: `current()`, `healthy`,
`on_failure`, `watch_registry`, `close()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from grpc_health.v1 import health_pb2

from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.smp.registry import Registry, RegistrySnapshot

if TYPE_CHECKING:
    from secure_runner.registry.chain import ChainRegistry
    from secure_runner.transport.decisions import DecisionRecorder

log = logging.getLogger(__name__)

REGISTRY_HEALTH_SERVICE = "secure_runner.registry"
WHO = "registry source"  # how audit lines name the registry adapter


class RegistryFile:
    def __init__(
        self,
        path: Path,
        check_interval: float = 1.0,
        *,
        on_failure: Callable[[ConfigError], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._check_interval = check_interval
        self._clock = clock
        self._on_failure = on_failure
        self._stamp, registry = self._load()
        self._snapshot = RegistrySnapshot(registry, int(clock()))
        self._failed_stamp: tuple[int, int] | None = None  # the file version whose failure was reported
        self.healthy = True  # False from a failed reload until the next good one
        self._next_check = time.monotonic() + check_interval

    def _load(self) -> tuple[tuple[int, int], Registry]:
        try:
            stat = os.stat(self.path)
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(ErrorCode.REGISTRY_INVALID, f"cannot read registry {self.path}: {exc}") from None
        return (stat.st_mtime_ns, stat.st_size), Registry.from_json(data)

    def current(self) -> RegistrySnapshot:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._check_interval
            self._refresh()
        return self._snapshot

    @property
    def fetched_at(self) -> int:
        """The current snapshot's `fetched_at`, without checking the file: for readers on other threads (metrics)."""
        return self._snapshot.fetched_at

    def close(self) -> None:
        """Nothing to release: the file is read on demand (the chain adapter's stops its refresh thread)."""

    def _refresh(self) -> None:
        stamp = (-1, -1)  # the version of a file that cannot even be stat'ed
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            registry = self._snapshot.registry
            if stamp != self._stamp:
                if stamp == self._failed_stamp:
                    return  # this version already failed: still stale, already reported
                stamp, registry = self._load()
                log.info("registry %s reloaded", self.path)
            self._stamp, self._snapshot = stamp, RegistrySnapshot(registry, int(self._clock()))
            self.healthy, self._failed_stamp = True, None
        except (OSError, ConfigError) as exc:
            error = exc if isinstance(exc, ConfigError) else ConfigError(
                ErrorCode.REGISTRY_INVALID, f"cannot stat registry {self.path}: {exc.strerror or exc}"
            )
            self.healthy = False
            if stamp == self._failed_stamp:
                return
            self._failed_stamp = stamp
            log.error("keeping the previous registry: %s", error)
            if self._on_failure is not None:
                self._on_failure(error)


class _Health(Protocol):
    async def set(self, service: str, status: int) -> None: ...


def audit_registry_failure(decisions: DecisionRecorder, error: ConfigError) -> None:
    """`RegistryFile(on_failure=...)` for a service: the refused registry version is a deny decision (audited)."""
    decisions.deny(error.code, WHO, {"event": "registry reload", "detail": error.message})


def open_registry_source(
    registry: Path | None, chain_config: Path | None = None, *, on_failure: Callable[[ConfigError], None] | None = None
) -> RegistryFile | ChainRegistry:
    """The registry file, or, given `chain_config` (a `ChainRegistryConfig` JSON file), the chain
    adapter after its first successful read, refreshing in the background until `close()`."""
    if chain_config is None:
        if registry is None:
            raise ConfigError(ErrorCode.REGISTRY_INVALID, "no registry: give a registry file or a chain configuration")
        return RegistryFile(registry, on_failure=on_failure)
    try:
        from secure_runner.registry.chain import ChainRegistry, ChainRegistryConfig  # the optional `chain` extra
    except ImportError as exc:
        raise ConfigError(ErrorCode.REGISTRY_INVALID, f"the chain registry needs the `chain` extra: {exc}") from None
    try:
        config = ChainRegistryConfig.from_json(chain_config.read_bytes())
    except OSError as exc:
        raise ConfigError(ErrorCode.REGISTRY_INVALID, f"cannot read chain configuration {chain_config}: {exc}") from None
    source = ChainRegistry(config, on_failure=on_failure)
    source.start()
    return source


async def watch_registry(source: RegistryFile | ChainRegistry, health: _Health, service: str, interval: float = 1.0) -> None:
    """Refresh `source` even without calls, and mirror its state in `health` (NOT_SERVING while reloads fail)."""
    states = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}
    while True:
        source.current()
        await health.set(service, states[source.healthy])
        await asyncio.sleep(interval)
