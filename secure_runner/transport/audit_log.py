"""The audit log files: every allow/deny decision appended as one hash-chained JSON line.

The record format, the chain, segments and checkpoints are specified in
`secure_runner.smp.audit`; this module owns the files. Choices, and why:

* **Verify before appending, in bounded time.** Opening the log verifies the
  live segment `FILE` (chained to the last line of the newest rotated segment)
  and resumes from its last hash and seq; a log that does not verify (changed,
  removed, reordered lines, or a torn last line) is refused with an `AuditError`
  naming the line, so the service does not start on top of evidence of tampering.
  The live segment is rotated to `FILE.<seq>` once it reaches `segment_bytes`, so
  this check reads at most that much; a live file already larger (left by an
  older version) is rotated at open after checking only its last line. The
  rotated segments are checked by `secure-runner audit verify`.
* **One `write(2)` per line, no fsync per line.** The file is opened `O_APPEND`
  and unbuffered, so each record reaches the kernel in one system call and no
  other appender can interleave inside it; a crash of this process loses nothing
  already recorded. An fsync per line would cost a disk flush (often milliseconds)
  on every call, more than the whole call budget. What it would protect against is
  an OS crash or power loss dropping the last lines still in the page cache: a
  truncated tail, which checkpoints and anchors bound. Rotation and `close()` fsync.
* **Counted refusals.** A peer refused again and again must not fill the disk:
  the first refusal of a peer for one reason is written at once, in full; the
  same peer's further refusals for that reason within `aggregate_seconds` are
  counted and written as one line (`what.repeats`) when the window ends (a
  background thread ends windows, and `close()` flushes them), or before that
  peer's next allow line, so the log stays in order. Allows are never counted.
  A peer never allowed writes at most two lines per reason and window; one
  that is (a coordinator's identity, even used by a thief without the key),
  at most two more per allow line of its own.
* **Signed checkpoints.** At open, every `checkpoint_seconds` while records are
  added, and at close, the head of the chain is signed with an Ed25519 key made
  for this open and kept only in this process's memory, and appended to
  `FILE.checkpoints` (see AUDIT-5/6). Its public key is logged at open.
* **One writer.** The live file is locked (`flock`, exclusive, non-blocking) while
  open: two writers appending to one chain would fork it, so the second is refused.
* **Fail closed.** If a line cannot be written whole (disk full, I/O error), the
  log stops: this and every later `record()` raise `AuditError(AUDIT_UNAVAILABLE)`,
  so no decision goes unrecorded silently.
* Files created mode 0600 (they name peers and models); thread-safe (one lock).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nacl.signing import SigningKey

from secure_runner.errors import AuditError, ErrorCode
from secure_runner.smp.audit import (
    DENY,
    GENESIS,
    MAX_LINE_BYTES,
    ChainHead,
    key_text,
    make_checkpoint,
    make_line,
    verify_chain,
    verify_last_line,
)

log = logging.getLogger(__name__)

__all__ = ["AuditLog", "checkpoint_file", "read_lines", "segment_files"]

SEGMENT_BYTES = 16 * 1024 * 1024
"""About 50,000 lines: verifying the live segment at start takes well under a second."""
MAX_OPEN_WINDOWS = 4096
"""Peers with counting windows open at once; past this, all are written out early."""


def read_lines(file: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary file, each at most MAX_LINE_BYTES + 1 bytes (a longer one fails verification)."""
    while line := file.readline(MAX_LINE_BYTES + 1):
        yield line


def segment_files(path: Path) -> list[Path]:
    """The rotated segments of the log at `path`, oldest first (the live `path` not included)."""
    pattern = re.compile(re.escape(path.name) + r"\.\d{12}")
    return sorted(p for p in path.parent.glob(path.name + ".*") if pattern.fullmatch(p.name))


def checkpoint_file(path: Path) -> Path:
    return path.with_name(path.name + ".checkpoints")


def _last_line(path: Path) -> bytes:
    """The last line of a file, read from its end (at most MAX_LINE_BYTES + 1 bytes)."""
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - MAX_LINE_BYTES - 1))
        tail = file.read()
    lines = tail.splitlines(keepends=True)
    return lines[-1] if lines else b""


def _end_of(path: Path) -> ChainHead:
    """Where the chain in `path` ends, from its last line; AuditError naming the file if it does not verify."""
    try:
        return verify_last_line(_last_line(path))
    except AuditError as exc:
        raise AuditError(exc.code, f"the last line of {path} does not verify: {exc.message}") from None


@dataclass
class _Window:
    """Refusals of one peer for one reason since the last one written in full."""

    until: float  # time.monotonic()
    since: float  # unix time of the refusal written in full
    repeats: int = 0
    rpc: str = ""


class AuditLog:
    """Append-only, hash-chained decision log in `path` (created 0600 if missing), rotated and checkpointed."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        aggregate_seconds: float = 1.0,
        checkpoint_seconds: float = 60.0,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._aggregate_seconds = aggregate_seconds
        self._checkpoint_seconds = checkpoint_seconds
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._windows: dict[str, dict[str, _Window]] = {}  # who -> code -> open counting window
        self._next_window_end = float("inf")
        self._fd: int | None = None
        self._checkpoints_fd: int | None = None
        self._fd, self._size, head = self._open_live()
        self._seq, self._last_hash = head.entries, head.last_hash
        self._segment_first_seq = self._seq - self._lines_in_live
        self._signing_key = SigningKey.generate()
        self.public_key = bytes(self._signing_key.verify_key)
        try:
            self._checkpoints_fd = os.open(
                checkpoint_file(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            self._close_fd()
            raise AuditError(ErrorCode.AUDIT_UNAVAILABLE, f"cannot open {checkpoint_file(self.path)}: {exc}") from None
        self._checkpointed: int | None = None
        self._last_checkpoint_at = time.monotonic()
        with self._lock:
            self._write_checkpoint()
        log.info("audit log %s opened at %d records; checkpoint key %s", self.path, self._seq,
                 key_text(self.public_key))
        self._stopping = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="audit-log", daemon=True)
        self._ticker.start()

    # -- opening -------------------------------------------------------------------------------

    def _open_live(self) -> tuple[int, int, ChainHead]:
        """Open, lock and verify the live segment; its fd, size and where its chain ends."""
        segments = segment_files(self.path)
        try:
            start = _end_of(segments[-1]) if segments else ChainHead(0, GENESIS)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(
                ErrorCode.AUDIT_UNAVAILABLE, f"cannot open audit log {self.path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            size = os.fstat(fd).st_size
            if size > self._segment_bytes:  # too big to verify now: `audit verify` checks it offline
                head = _end_of(self.path)
                self._lines_in_live = 0
                fd = self._rotate(fd, head, self._first_seq_of(self.path))
                return fd, 0, head
            with open(os.dup(fd), "rb") as reader:
                counted = _Counted(read_lines(reader))
                head = verify_chain(counted, start=start)
            self._lines_in_live = counted.count
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
                exc.code, f"audit log {self.path} does not verify, refusing to append to it: {exc.message}",
                line=exc.line,
            ) from None
        except OSError as exc:
            os.close(fd)
            raise AuditError(
                ErrorCode.AUDIT_UNAVAILABLE, f"cannot read audit log {self.path}: {exc.strerror or exc}"
            ) from None
        return fd, size, head

    def _first_seq_of(self, path: Path) -> int:
        with open(path, "rb") as file:
            return verify_last_line(file.readline(MAX_LINE_BYTES + 1)).entries - 1

    def _rotate(self, fd: int, head: ChainHead, first_seq: int) -> int:
        """Move the live segment aside as `FILE.<first seq>`; a new, locked, empty live file's fd."""
        os.fsync(fd)
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{first_seq:012d}"))
        new_fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(new_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        return new_fd

    # -- the chain -----------------------------------------------------------------------------

    @property
    def entries(self) -> int:
        """How many records the log holds (the next record's seq)."""
        return self._seq

    @property
    def last_hash(self) -> str:
        """The hash of the last record, GENESIS for an empty log."""
        return self._last_hash

    def record(self, *, decision: str, code: str, who: str, what: Mapping[str, str]) -> None:
        """Append one decision ("allow" / "deny") and hand it to the kernel before returning.

        A peer's refusal for a reason it was refused for within the last
        `aggregate_seconds`, and not allowed anything since, is only counted
        here, and written with its window.
        """
        with self._lock:
            self._check_open()
            now, tick = self._clock(), time.monotonic()
            if tick >= self._next_window_end:
                self._end_windows(tick)
            if decision == DENY:
                windows = self._windows.get(who)
                window = windows.get(code) if windows is not None else None
                if window is not None:
                    window.repeats += 1
                    window.rpc = str(what.get("rpc", ""))
                    return
                if windows is None:
                    if len(self._windows) >= MAX_OPEN_WINDOWS:
                        self._end_windows(float("inf"))
                    windows = self._windows[str(who)] = {}
                windows[str(code)] = _Window(until=tick + self._aggregate_seconds, since=now)
                self._next_window_end = min(self._next_window_end, tick + self._aggregate_seconds)
            elif who in self._windows:  # allowed now: its earlier refusals are counted before this line
                self._write_counts(who, self._windows.pop(who))
            self._append(now, decision, code, who, what)

    def _check_open(self) -> None:
        if self._fd is None:
            raise AuditError(ErrorCode.AUDIT_UNAVAILABLE, self._failure or f"audit log {self.path} is closed")

    def _append(self, now: float, decision: str, code: str, who: str, what: Mapping[str, str]) -> None:
        line, digest = make_line(self._last_hash, self._seq, time=now, decision=decision, code=code, who=who, what=what)
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            written, reason = -1, exc.strerror or str(exc)
        else:
            reason = f"short write ({written} of {len(line)} bytes)"
        if written != len(line):
            self._fail(f"audit log {self.path} failed at seq {self._seq}: {reason}; no more records")
        self._last_hash, self._seq, self._size = digest, self._seq + 1, self._size + written
        if self._size >= self._segment_bytes:
            try:
                self._fd = self._rotate(self._fd, ChainHead(self._seq, self._last_hash), self._segment_first_seq)
            except OSError as exc:
                self._fail(f"audit log {self.path} could not rotate at seq {self._seq}: {exc}; no more records")
            self._size, self._segment_first_seq = 0, self._seq

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._close_fd()
        raise AuditError(ErrorCode.AUDIT_UNAVAILABLE, reason)

    def _end_windows(self, tick: float) -> None:
        """Write the counted line of every window that ended by `tick` (monotonic; and had repeats)."""
        for who in list(self._windows):
            windows = self._windows[who]
            ended = {code: windows.pop(code) for code in [c for c, w in windows.items() if w.until <= tick]}
            if not windows:
                del self._windows[who]
            self._write_counts(who, ended)
        self._next_window_end = min(
            (w.until for windows in self._windows.values() for w in windows.values()), default=float("inf")
        )

    def _write_counts(self, who: str, windows: Mapping[str, _Window]) -> None:
        """One counted line per closed window that had repeats."""
        for code, window in windows.items():
            if window.repeats:
                what = {"rpc": window.rpc, "repeats": str(window.repeats), "since": f"{window.since:.3f}"}
                self._append(self._clock(), DENY, code, who, what)

    # -- checkpoints ---------------------------------------------------------------------------

    def _write_checkpoint(self) -> None:
        if self._checkpointed == self._seq:
            return
        line = make_checkpoint(
            self._seq, self._last_hash, time=time.time(), public_key=self.public_key,
            sign=lambda message: self._signing_key.sign(message).signature,
        )
        try:
            written = os.write(self._checkpoints_fd, line)
        except OSError as exc:
            written = -1
            reason = exc.strerror or str(exc)
        else:
            reason = "short write"
        if written != len(line):
            self._fail(f"audit checkpoints {checkpoint_file(self.path)} failed: {reason}; no more records")
        self._checkpointed, self._last_checkpoint_at = self._seq, time.monotonic()

    def _tick(self) -> None:
        """End counted-refusal windows on time, and checkpoint every `checkpoint_seconds`."""
        interval = max(0.05, min(self._aggregate_seconds, self._checkpoint_seconds))
        while not self._stopping.wait(interval):
            with self._lock:
                if self._fd is None:
                    return
                try:
                    tick = time.monotonic()
                    if tick >= self._next_window_end:
                        self._end_windows(tick)
                    if tick - self._last_checkpoint_at >= self._checkpoint_seconds:
                        self._write_checkpoint()
                except AuditError as exc:
                    log.error("%s", exc.message)
                    return

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Write pending counts and a last checkpoint, flush the files to disk and close them (idempotent)."""
        with self._lock:
            if self._fd is not None:
                try:
                    self._end_windows(float("inf"))
                    self._write_checkpoint()
                    os.fsync(self._checkpoints_fd)
                    os.fsync(self._fd)
                finally:
                    self._close_fd()
        self._stopping.set()
        if self._ticker is not threading.current_thread():
            self._ticker.join()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        checkpoints_fd, self._checkpoints_fd = self._checkpoints_fd, None
        if checkpoints_fd is not None:
            os.close(checkpoints_fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Counted:
    """An iterator over lines that counts them (how many lines the live segment holds)."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self._lines, self.count = lines, 0

    def __iter__(self) -> Iterator[bytes]:
        for line in self._lines:
            self.count += 1
            yield line
