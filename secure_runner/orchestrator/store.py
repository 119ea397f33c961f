"""The orchestrator's durable state: what it must know to find its runners again after a restart.

One SQLite file (stdlib `sqlite3`, the embedded default) beside the PKI folder. It
holds, per node, the launcher's handle of the runner believed up (for the local
launcher: pid, start time, control socket, the node's deployment id) and its
consecutive failures; per model, its node, its submission folder, the ModelInfo last
announced (deployment, address, state, reason, delegation), its restart count and its
last failure. Every change is written as it is made (a runner's handle as soon as it
is up), so a SIGKILL at any point leaves a store that describes runners that exist, or
ones that are gone (which a restart finds dead and restarts); a runner started but not
yet recorded is found by its control socket and killed when its node starts again
(`ProcessLauncher`).

Only one orchestrator uses a store at a time (an exclusive lock beside it, released
when its process ends, however it ends). The file is created 0600: it names runner
addresses and holds delegations (public, but nobody else's business). Writes run on the event loop; they are small and few
(state changes, not calls).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.runner.call_stats import CallStats
from secure_runner.v1 import orchestrator_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    handle TEXT NOT NULL DEFAULT '',          -- the launcher's JSON to find the runner again; '' = none up
    failures INTEGER NOT NULL DEFAULT 0       -- consecutive runner failures
);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    path TEXT NOT NULL,                       -- the submission folder
    info BLOB NOT NULL,                       -- ModelInfo as last announced
    restarts INTEGER NOT NULL DEFAULT 0,
    failure_code TEXT NOT NULL DEFAULT '',
    failure_message TEXT NOT NULL DEFAULT '',
    failure_ms INTEGER NOT NULL DEFAULT 0
);
"""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class ModelRecord:
    """One model as the store keeps it."""

    info: orchestrator_pb2.ModelInfo
    path: Path
    restarts: int = 0
    failure_code: str = ""
    failure_message: str = ""
    failure_ms: int = 0
    calls: CallStats | None = None  # its runner's call counters, as last polled (not stored: per deployment)

    def fail(self, code: str, message: str) -> None:
        self.failure_code, self.failure_message, self.failure_ms = code, message[:500], now_ms()


@dataclass
class NodeRecord:
    node_id: str
    handle: dict = field(default_factory=dict)
    failures: int = 0


class StateStore:
    """The SQLite file; one per orchestrator (one crunch)."""

    def __init__(self, path: Path, crunch_id: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One orchestrator per store: two would adopt, restart and stop the same runners.
        self._lock = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise ConfigError(ErrorCode.INVALID_VALUE, f"another orchestrator is using the state store {path}") from None
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit; `with self._db` for a transaction
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'crunch_id'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('crunch_id', ?)", (crunch_id,))
        elif row[0] != crunch_id:
            self.close()
            raise ConfigError(ErrorCode.INVALID_VALUE, f"state store {path} belongs to crunch {row[0]!r}")

    def nodes(self) -> dict[str, NodeRecord]:
        rows = self._db.execute("SELECT node_id, handle, failures FROM nodes ORDER BY node_id")
        return {n: NodeRecord(n, json.loads(h) if h else {}, f) for n, h, f in rows}

    def models(self) -> dict[str, ModelRecord]:
        rows = self._db.execute(
            "SELECT model_id, path, info, restarts, failure_code, failure_message, failure_ms FROM models ORDER BY model_id"
        )
        return {
            model_id: ModelRecord(orchestrator_pb2.ModelInfo.FromString(info), Path(path), restarts, code, message, ms)
            for model_id, path, info, restarts, code, message, ms in rows
        }

    def put_node(self, node: NodeRecord) -> None:
        self._db.execute(
            "INSERT INTO nodes VALUES (?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET handle = excluded.handle, "
            "failures = excluded.failures",
            (node.node_id, json.dumps(node.handle) if node.handle else "", node.failures),
        )

    def put_model(self, record: ModelRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (record.info.model_id, record.info.node_id, str(record.path), record.info.SerializeToString(),
             record.restarts, record.failure_code, record.failure_message, record.failure_ms),
        )

    def close(self) -> None:
        self._db.close()
        if self._lock >= 0:
            os.close(self._lock)  # releases the lock (a killed orchestrator's goes with its process)
            self._lock = -1
