"""The audit log's records and hash chain: building lines and verifying them.

Pure: bytes in, bytes and verdicts out; the file itself is handled by
`secure_runner.transport.audit_log.AuditLog` and `secure-runner audit verify`.

Chain rules, for an auditor (a verifier in any language needs only these):

AUDIT-1  The log is UTF-8 text, one record per line, every line ending in one
         LF ("\\n"), no blank lines, no line longer than `MAX_LINE_BYTES`.
AUDIT-2  A record is a JSON object with exactly the members
         `code` (string: the rule / reason code; allow records use "OK"),
         `decision` ("allow" or "deny"), `hash`, `prev` (64 lowercase hex digits
         each), `seq` (integer >= 0), `time` (number: unix seconds when it was
         written), `what` (object of string values: rpc, model, method, ...) and
         `who` (string: the peer's SPIFFE id, or a key id),
         written in canonical form: members sorted by name, no whitespace between
         tokens, non-ASCII characters as raw UTF-8 (Python's
         `json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`).
         A line in any other form is AUDIT_MALFORMED.
AUDIT-3  `hash` is the lowercase hex SHA-256 of the record's canonical JSON
         *without* the `hash` member. Because members are sorted and `hash` sits
         between `decision` and `prev`, those bytes are exactly the line with its
         `,"hash":"<64 hex>"` member and its final LF cut out: a verifier never has
         to re-serialize JSON (or floats) itself. A mismatch is AUDIT_TAMPERED:
         the line was changed after it was written.
AUDIT-4  Line 1 has `seq` 0 and `prev` = GENESIS (64 zeros); line k+1 has
         `seq` k and `prev` = the `hash` of line k. A break is
         AUDIT_BROKEN_CHAIN: a line was removed, inserted, duplicated or moved
         (or changed, with its hash recomputed, unless it is the last line).

Checks run per line in that order (1, 2, 3, 4), and the first failure names its
1-based line number.

What the chain cannot detect, and how it is anchored: the chain has no secret
key, so it proves only that the lines form one unbroken sequence. Whoever can
write the file can cut off its tail (the last lines, or all of them) and the
rest still verifies; they can also rewrite everything from some line onwards
and recompute every later hash. What pins the past is a hash kept elsewhere:
`secure-runner audit verify FILE` prints the number of entries and the last
hash, an operator (or a cron job) records that line off the machine (a ticket,
another host, a chain transaction), and later runs
`secure-runner audit verify FILE --anchor HASH`, which also fails unless a line
with that hash is still in the chain. Everything up to an anchored line is then
proven unchanged; only the lines after the newest anchor can still be truncated
or rewritten unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from secure_runner.errors import AuditError, ErrorCode

__all__ = [
    "ALLOW",
    "DENY",
    "GENESIS",
    "MAX_LINE_BYTES",
    "MAX_TEXT_CHARS",
    "MAX_WHAT_ITEMS",
    "ChainHead",
    "encode_entry",
    "make_entry",
    "make_line",
    "verify_chain",
    "verify_lines",
]

GENESIS = "0" * 64
ALLOW = "allow"
DENY = "deny"
DECISIONS = frozenset({ALLOW, DENY})
FIELDS = frozenset({"code", "decision", "hash", "prev", "seq", "time", "what", "who"})

MAX_TEXT_CHARS = 256
"""Longer strings (peer-chosen method names, ...) are cut to this and marked with "..."."""
MAX_WHAT_ITEMS = 16
MAX_LINE_BYTES = 128 * 1024
"""Well above the longest line `make_line` can write; a longer line is AUDIT_MALFORMED."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_PREV_MEMBER = b',"prev":"'  # never inside a string before it: a '"' there is escaped


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical(record: Mapping[str, object]) -> bytes:
    return _ENCODER.encode(record).encode("utf-8")


def _text(value: object, what: str) -> str:
    """A plain str: capped at MAX_TEXT_CHARS, lone surrogates replaced so it encodes as UTF-8."""
    if type(value) is str:
        text = value
    elif isinstance(value, str):
        text = str.__str__(value)  # a StrEnum (ErrorCode) becomes its plain value
    else:
        raise AuditError(ErrorCode.AUDIT_MALFORMED, f"{what} must be a string, got {type(value).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS] + "..."
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _record(
    prev_hash: str, seq: int, *, time: float, decision: str, code: str, who: str, what: Mapping[str, str]
) -> dict[str, object]:
    """The record without its hash, every field checked and normalized."""
    if not isinstance(prev_hash, str) or not _HEX64.fullmatch(prev_hash):
        raise AuditError(ErrorCode.AUDIT_MALFORMED, "prev must be 64 lowercase hex digits")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise AuditError(ErrorCode.AUDIT_MALFORMED, f"seq must be an integer >= 0, got {seq!r}")
    try:
        seconds = float(time) if isinstance(time, (int, float)) and not isinstance(time, bool) else math.nan
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise AuditError(ErrorCode.AUDIT_MALFORMED, f"time must be a finite number, got {time!r}")
    if not isinstance(decision, str) or decision not in DECISIONS:
        raise AuditError(ErrorCode.AUDIT_MALFORMED, f"decision must be 'allow' or 'deny', got {decision!r}")
    if not isinstance(what, Mapping) or len(what) > MAX_WHAT_ITEMS:
        raise AuditError(ErrorCode.AUDIT_MALFORMED, f"what must be a mapping of at most {MAX_WHAT_ITEMS} strings")
    return {
        "code": _text(code, "code"),
        "decision": str.__str__(decision),
        "prev": prev_hash,
        "seq": seq,
        "time": seconds,
        "what": {_text(key, "what key"): _text(value, f"what[{key!r}]") for key, value in what.items()},
        "who": _text(who, "who"),
    }


def _with_hash(body: bytes, digest: str) -> bytes:
    """The canonical line of a record from the canonical JSON of its hash-less body."""
    cut = body.index(_PREV_MEMBER)
    return b"".join((body[:cut], b',"hash":"', digest.encode("ascii"), b'"', body[cut:], b"\n"))


def make_line(prev_hash: str, seq: int, **fields: Any) -> tuple[bytes, str]:
    """The next line to append (canonical, ending in LF) and its hash: one JSON encoding, one SHA-256.

    Takes `make_entry`'s arguments and equals `encode_entry(make_entry(...))`, in
    about two thirds of the time: the hot path of `AuditLog.record`.
    """
    body = _canonical(_record(prev_hash, seq, **fields))
    digest = hashlib.sha256(body).hexdigest()
    return _with_hash(body, digest), digest


def make_entry(
    prev_hash: str,
    seq: int,
    *,
    time: float,
    decision: str,
    code: str,
    who: str,
    what: Mapping[str, str],
) -> dict[str, object]:
    """The record that follows the one whose hash is `prev_hash` (GENESIS for the first), with its hash."""
    record = _record(prev_hash, seq, time=time, decision=decision, code=code, who=who, what=what)
    record["hash"] = hashlib.sha256(_canonical(record)).hexdigest()
    return record


def encode_entry(entry: Mapping[str, object]) -> bytes:
    """The canonical line of a record (with its hash), ending in LF."""
    return _canonical(entry) + b"\n"


@dataclass(frozen=True)
class ChainHead:
    """Where a verified chain ends: how many records, and the last hash (GENESIS if none)."""

    entries: int
    last_hash: str


def _parse(line: bytes, number: int) -> dict[str, object]:
    """AUDIT-1 and AUDIT-2 for one line."""

    def malformed(reason: str) -> AuditError:
        return AuditError(ErrorCode.AUDIT_MALFORMED, f"line {number}: {reason}", line=number)

    if len(line) > MAX_LINE_BYTES:
        raise malformed(f"longer than {MAX_LINE_BYTES} bytes")
    if not line.endswith(b"\n"):
        raise malformed("does not end with a line feed (cut short?)")
    try:
        record = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise malformed("not a JSON object in UTF-8") from None
    if not isinstance(record, dict) or record.keys() != FIELDS:
        raise malformed(f"a record has exactly the members {', '.join(sorted(FIELDS))}")
    seq, time, what = record["seq"], record["time"], record["what"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise malformed("seq is not an integer >= 0")
    if isinstance(time, bool) or not isinstance(time, (int, float)):
        raise malformed("time is not a number")
    if not isinstance(record["decision"], str) or record["decision"] not in DECISIONS:
        raise malformed("decision is neither 'allow' nor 'deny'")
    if not (isinstance(record["code"], str) and isinstance(record["who"], str)):
        raise malformed("code and who must be strings")
    if not isinstance(what, dict) or not all(isinstance(value, str) for value in what.values()):
        raise malformed("what is not an object of strings")
    for name in ("prev", "hash"):
        if not isinstance(record[name], str) or not _HEX64.fullmatch(record[name]):
            raise malformed(f"{name} is not 64 lowercase hex digits")
    return record


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def verify_chain(lines: Iterable[bytes], *, anchor: str | None = None) -> ChainHead:
    """Check AUDIT-1..4 on `lines` (as read from the file in binary mode, each ending in LF).

    Raises `AuditError` naming the first bad line. With `anchor` (a hash recorded
    from an earlier verification), the chain must also still contain that hash.
    """
    expected_prev, seq, anchored = GENESIS, 0, anchor is None
    for number, line in enumerate(lines, start=1):
        record = _parse(line, number)
        digest = record.pop("hash")
        body = _canonical(record)
        if _with_hash(body, digest) != line:
            raise AuditError(
                ErrorCode.AUDIT_MALFORMED, f"line {number}: not in canonical form (AUDIT-2)", line=number
            )
        if hashlib.sha256(body).hexdigest() != digest:
            raise AuditError(
                ErrorCode.AUDIT_TAMPERED,
                f"line {number}: its hash does not match its content (the line was changed)",
                line=number,
            )
        if record["seq"] != seq:
            raise AuditError(
                ErrorCode.AUDIT_BROKEN_CHAIN,
                f"line {number}: seq is {record['seq']}, expected {seq} (a line was removed, inserted or moved)",
                line=number,
            )
        if record["prev"] != expected_prev:
            previous = "the genesis hash" if number == 1 else f"the hash of line {number - 1}"
            raise AuditError(
                ErrorCode.AUDIT_BROKEN_CHAIN,
                f"line {number}: prev is not {previous} (a line before it was removed, replaced or moved)",
                line=number,
            )
        anchored = anchored or digest == anchor
        expected_prev, seq = digest, seq + 1
    if not anchored:
        raise AuditError(
            ErrorCode.AUDIT_BROKEN_CHAIN,
            f"line {seq}: the chain ends without the anchored hash {anchor} (truncated or rewritten)",
            line=seq,
        )
    return ChainHead(seq, expected_prev)


def verify_lines(lines: Iterable[bytes]) -> int:
    """Check AUDIT-1..4 on `lines` and return the number of records (see `verify_chain`)."""
    return verify_chain(lines).entries
