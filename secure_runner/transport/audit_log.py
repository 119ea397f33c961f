"""The audit log file: every allow/deny decision appended as one hash-chained JSON line.

The record format and the chain rules live in `secure_runner.smp.audit`; this
module owns the file. Choices, and why:

* **Verify before appending.** Opening an existing log verifies its whole chain
  and resumes from its last hash and seq; a log that does not verify (changed,
  removed, reordered lines, or a torn last line) is refused with an `AuditError`
  naming the line, so the service does not start on top of evidence of tampering.
  An operator inspects it, moves it aside (keeping it) and starts a new log.
* **One `write(2)` per line, no fsync per line.** The file is opened `O_APPEND`
  and unbuffered, so each record reaches the kernel in one system call and no
  other appender can interleave inside it; a crash of this process loses nothing
  already recorded. An fsync per line would cost a disk flush (often milliseconds)
  on every call, more than the whole call budget. What it would protect against is
  an OS crash or power loss dropping the last lines still in the page cache: that
  is a truncated tail, which the chain cannot tell apart from deliberate truncation
  anyway, and which anchoring (see `smp.audit`) bounds. `close()` does fsync.
* **One writer.** The file is locked (`flock`, exclusive, non-blocking) while
  open: two writers appending to one chain (two processes, or two `AuditLog`
  objects in one process) would fork it, so the second is refused at open.
* **Fail closed.** If a line cannot be written whole (disk full, I/O error), the
  log stops: this and every later `record()` raise `AuditError(AUDIT_UNAVAILABLE)`,
  so no decision goes unrecorded silently.
* Created mode 0600 (it names peers and models); not thread-safe by design but
  guarded by a lock anyway, which costs well under a microsecond.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from secure_runner.errors import AuditError, ErrorCode
from secure_runner.smp.audit import MAX_LINE_BYTES, make_line, verify_chain

__all__ = ["AuditLog", "read_lines"]


def read_lines(file: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary file, each at most MAX_LINE_BYTES + 1 bytes (a longer one fails verification)."""
    while line := file.readline(MAX_LINE_BYTES + 1):
        yield line


class AuditLog:
    """Append-only, hash-chained decision log in `path` (created 0600 if missing)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._failure: str | None = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(
                ErrorCode.AUDIT_UNAVAILABLE, f"cannot open audit log {self.path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with open(os.dup(fd), "rb") as reader:
                head = verify_chain(read_lines(reader))
        except BlockingIOError:
            os.close(fd)
            raise AuditError(
                ErrorCode.AUDIT_UNAVAILABLE,
                f"audit log {self.path} is already open for writing (by another process or AuditLog);"
                " two writers would fork its chain",
            ) from None
        except AuditError as exc:
            os.close(fd)
            raise AuditError(
                exc.code,
                f"audit log {self.path} does not verify, refusing to append to it: {exc.message}",
                line=exc.line,
            ) from None
        except OSError as exc:
            os.close(fd)
            raise AuditError(
                ErrorCode.AUDIT_UNAVAILABLE, f"cannot read audit log {self.path}: {exc.strerror or exc}"
            ) from None
        self._fd: int | None = fd
        self._seq = head.entries
        self._last_hash = head.last_hash

    @property
    def entries(self) -> int:
        """How many records the log holds (the next record's seq)."""
        return self._seq

    @property
    def last_hash(self) -> str:
        """The hash of the last record, GENESIS for an empty log."""
        return self._last_hash

    def record(self, *, decision: str, code: str, who: str, what: Mapping[str, str]) -> None:
        """Append one decision ("allow" / "deny") and hand it to the kernel before returning."""
        with self._lock:
            if self._fd is None:
                raise AuditError(ErrorCode.AUDIT_UNAVAILABLE, self._failure or f"audit log {self.path} is closed")
            line, digest = make_line(
                self._last_hash, self._seq, time=self._clock(), decision=decision, code=code, who=who, what=what
            )
            try:
                written = os.write(self._fd, line)
            except OSError as exc:
                written, reason = -1, exc.strerror or str(exc)
            else:
                reason = f"short write ({written} of {len(line)} bytes)"
            if written != len(line):
                self._failure = f"audit log {self.path} failed at seq {self._seq}: {reason}; no more records"
                self._close_fd()
                raise AuditError(ErrorCode.AUDIT_UNAVAILABLE, self._failure)
            self._last_hash, self._seq = digest, self._seq + 1

    def close(self) -> None:
        """Flush the file to disk and close it (idempotent)."""
        with self._lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                finally:
                    self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

