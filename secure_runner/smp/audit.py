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

Counted refusals: a `deny` record whose `what` holds `repeats` (a decimal count)
and `since` (unix seconds) stands for that many further refusals of the same
`who` for the same `code`, made after the one written in full at `since` and
within the writer's counting window; its `rpc` is the last one's.

Segments (AUDIT-4 across files): the writer rotates the log into segments,
`FILE.<seq of its first line, 12 digits>`, the live one staying `FILE`. The
chain simply continues: a segment's first line has the next `seq` and `prev` =
the hash of the previous segment's last line, so the segments read in order
are one chain. The writer verifies only the live segment when it starts (its
size is bounded), so it starts in bounded time whatever the total size.

Signed checkpoints (AUDIT-5, AUDIT-6): the chain has no secret key, so it proves
only that the lines form one unbroken sequence: whoever can write the file can
cut off its tail, or rewrite everything from some line onwards and recompute
every later hash. So the writer also appends, to `FILE.checkpoints`, a signed
statement of the chain head: when it opens the log, every `checkpoint_seconds`
while records are added, and when it closes. Each checkpoint line is the
canonical JSON object with exactly the members `entries` (integer: records
covered), `hash` (the hash of record `entries`, GENESIS for 0), `key` (base64url
Ed25519 public key), `sig` (base64url Ed25519 signature) and `time`.

AUDIT-5  `sig` is the signature, by `key`, of `CHECKPOINT_DOMAIN` followed by the
         canonical JSON of the checkpoint without `sig`; `entries` never
         decreases from one checkpoint line to the next. Else AUDIT_TAMPERED.
AUDIT-6  For every checkpoint, the chain's record number `entries` has that
         `hash`. A chain shorter than a checkpoint, or with another hash there,
         is AUDIT_BROKEN_CHAIN: it was truncated or rewritten after being signed.

The signing key is generated in memory each time the writer opens the log and
never stored: neither a submission (whose worker cannot read the runner's memory)
nor anyone reading the disk later holds it. What remains: whoever can write
*both* files can drop signed checkpoints from the end of `FILE.checkpoints`
together with the log's tail, or forge a whole new history with a key of their
own. The writer logs its public key when it opens the log; `audit verify
--key KEY` refuses checkpoints signed by any key not given, and `--anchor HASH`
(a last hash recorded elsewhere) must still be in the chain: what an operator
keeps off the machine pins everything up to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from secure_runner.errors import AuditError, ErrorCode

__all__ = [
    "ALLOW",
    "DENY",
    "GENESIS",
    "MAX_LINE_BYTES",
    "MAX_TEXT_CHARS",
    "MAX_WHAT_ITEMS",
    "CHECKPOINT_DOMAIN",
    "ChainHead",
    "Checkpoint",
    "encode_entry",
    "key_text",
    "make_checkpoint",
    "parse_checkpoints",
    "verify_last_line",
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

CHECKPOINT_DOMAIN = b"secure-runner audit checkpoint v1\n"
CHECKPOINT_FIELDS = frozenset({"entries", "hash", "key", "sig", "time"})

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


def _checked_record(line: bytes, number: int) -> tuple[dict[str, object], str]:
    """AUDIT-1..3 for one line: the record (without its hash) and its hash."""
    record = _parse(line, number)
    digest = record.pop("hash")
    body = _canonical(record)
    if _with_hash(body, digest) != line:
        raise AuditError(ErrorCode.AUDIT_MALFORMED, f"line {number}: not in canonical form (AUDIT-2)", line=number)
    if hashlib.sha256(body).hexdigest() != digest:
        raise AuditError(
            ErrorCode.AUDIT_TAMPERED, f"line {number}: its hash does not match its content (the line was changed)",
            line=number,
        )
    return record, digest


def verify_last_line(line: bytes) -> ChainHead:
    """Where a chain ends, from its last line alone (AUDIT-1..3 on that line): how the next segment starts."""
    record, digest = _checked_record(line, 1)
    return ChainHead(record["seq"] + 1, digest)


def verify_chain(
    lines: Iterable[bytes],
    *,
    anchor: str | None = None,
    start: ChainHead = ChainHead(0, GENESIS),
    checkpoints: Sequence[Checkpoint] = (),
) -> ChainHead:
    """Check AUDIT-1..4 on `lines` (as read from the file in binary mode, each ending in LF).

    Raises `AuditError` naming the first bad line (1-based, counted from the
    first of `lines`). `start` is where the previous segment ended (the
    genesis for the first). With `anchor` (a hash recorded from an earlier
    verification), the chain must also still contain that hash. `checkpoints`
    (from `parse_checkpoints`) are checked against the chain (AUDIT-6), those
    before `start` excepted.
    """
    expected_prev, seq, anchored = start.last_hash, start.entries, anchor is None
    pending = sorted((c for c in checkpoints if c.entries >= seq), key=lambda c: c.entries)
    number = 0
    while pending and pending[0].entries == seq:
        _check_checkpoint(pending.pop(0), expected_prev, number)
    for number, line in enumerate(lines, start=1):
        record, digest = _checked_record(line, number)
        if record["seq"] != seq:
            raise AuditError(
                ErrorCode.AUDIT_BROKEN_CHAIN,
                f"line {number}: seq is {record['seq']}, expected {seq} (a line was removed, inserted or moved)",
                line=number,
            )
        if record["prev"] != expected_prev:
            previous = "the hash of the previous line" if number > 1 or seq else "the genesis hash"
            raise AuditError(
                ErrorCode.AUDIT_BROKEN_CHAIN,
                f"line {number}: prev is not {previous} (a line before it was removed, replaced or moved)",
                line=number,
            )
        anchored = anchored or digest == anchor
        expected_prev, seq = digest, seq + 1
        while pending and pending[0].entries == seq:
            _check_checkpoint(pending.pop(0), expected_prev, number)
    if not anchored:
        raise AuditError(
            ErrorCode.AUDIT_BROKEN_CHAIN,
            f"line {number}: the chain ends without the anchored hash {anchor} (truncated or rewritten)",
            line=number,
        )
    if pending:
        raise AuditError(
            ErrorCode.AUDIT_BROKEN_CHAIN,
            f"line {number}: the chain ends at {seq} records, but checkpoint line {pending[-1].line} signed"
            f" {pending[-1].entries} (truncated after a checkpoint)",
            line=number,
        )
    return ChainHead(seq, expected_prev)


def _check_checkpoint(checkpoint: Checkpoint, chain_hash: str, number: int) -> None:
    """AUDIT-6 for one checkpoint, at the record it covers up to."""
    if checkpoint.last_hash != chain_hash:
        raise AuditError(
            ErrorCode.AUDIT_BROKEN_CHAIN,
            f"line {number}: checkpoint line {checkpoint.line} signed another hash for record"
            f" {checkpoint.entries} (the log was rewritten after it was signed)",
            line=number,
        )


# --------------------------------------------------------------------------- signed checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: the chain had `entries` records ending in `last_hash`, signed by `key`."""

    entries: int
    last_hash: str
    key: str
    line: int


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def key_text(public_key: bytes) -> str:
    """How checkpoints, the writer's log and `audit verify --key` write a public key: base64url, unpadded."""
    return _b64url(public_key)


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_checkpoint(
    entries: int, last_hash: str, *, time: float, public_key: bytes, sign: Callable[[bytes], bytes]
) -> bytes:
    """The checkpoint line (canonical, ending in LF) stating that the chain has `entries` records ending in `last_hash`.

    `sign` is the writer's Ed25519 signing function (64-byte signatures), so the key stays with it.
    """
    body = {"entries": entries, "hash": last_hash, "key": key_text(public_key), "time": float(time)}
    signature = sign(CHECKPOINT_DOMAIN + _canonical(body))
    return _canonical({**body, "sig": _b64url(signature)}) + b"\n"


def parse_checkpoints(lines: Iterable[bytes], *, keys: Collection[str] | None = None) -> list[Checkpoint]:
    """AUDIT-5 on the lines of a checkpoint file; with `keys`, only checkpoints signed by one of them pass."""
    checkpoints: list[Checkpoint] = []
    for number, line in enumerate(lines, start=1):

        def bad(code: ErrorCode, reason: str) -> AuditError:
            return AuditError(code, f"checkpoint line {number}: {reason}", line=number)

        try:
            record = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
            valid_shape = (
                line.endswith(b"\n") and isinstance(record, dict) and record.keys() == CHECKPOINT_FIELDS
                and type(record["entries"]) is int and record["entries"] >= 0
                and isinstance(record["hash"], str) and _HEX64.fullmatch(record["hash"]) is not None
                and type(record["time"]) in (int, float)
                and all(isinstance(record[name], str) for name in ("key", "sig"))
            )
            if not valid_shape:
                raise ValueError("shape")
            body = {name: record[name] for name in ("entries", "hash", "key", "time")}
            if _canonical({**body, "sig": record["sig"]}) + b"\n" != line:
                raise ValueError("not canonical")
            VerifyKey(_unb64(record["key"])).verify(CHECKPOINT_DOMAIN + _canonical(body), _unb64(record["sig"]))
        except BadSignatureError:
            raise bad(ErrorCode.AUDIT_TAMPERED, "its signature does not verify (the line was changed)") from None
        except (UnicodeDecodeError, ValueError, TypeError, RecursionError):
            raise bad(ErrorCode.AUDIT_MALFORMED, "not a canonical checkpoint (AUDIT-5)") from None
        if keys is not None and record["key"] not in keys:
            raise bad(ErrorCode.AUDIT_TAMPERED, f"signed by {record['key']}, not by a key given with --key")
        if checkpoints and record["entries"] < checkpoints[-1].entries:
            raise bad(ErrorCode.AUDIT_TAMPERED, "covers fewer records than the checkpoint before it")
        checkpoints.append(Checkpoint(record["entries"], record["hash"], record["key"], number))
    return checkpoints


def verify_lines(lines: Iterable[bytes]) -> int:
    """Check AUDIT-1..4 on `lines` and return the number of records (see `verify_chain`)."""
    return verify_chain(lines).entries
