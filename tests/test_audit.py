"""The audit log: canonical lines, the hash chain, the file, and `secure-runner audit verify`."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_runner import audit_cli, cli
from secure_runner.errors import AuditError, ErrorCode
from secure_runner.smp import audit
from secure_runner.smp.audit import GENESIS, encode_entry, make_entry, make_line, verify_chain, verify_lines
from secure_runner.transport.audit_log import AuditLog

WHO = "spiffe://c1/coordinator/k0123456789abcdef01234567"


def _entries(count: int, who: str = WHO) -> list[dict]:
    entries, prev = [], GENESIS
    for seq in range(count):
        entry = make_entry(
            prev,
            seq,
            time=1_700_000_000.25 + seq,
            decision="deny" if seq % 3 == 2 else "allow",
            code="TOKEN_EXPIRED" if seq % 3 == 2 else "OK",
            who=who,
            what={"rpc": "/secure_runner.v1.ModelRunner/Call", "model": f"m{seq}", "method": "infer"},
        )
        entries.append(entry)
        prev = entry["hash"]
    return entries


def _lines(count: int, who: str = WHO) -> list[bytes]:
    return [encode_entry(entry) for entry in _entries(count, who)]


def _verify_error(lines: list[bytes]) -> AuditError:
    with pytest.raises(AuditError) as err:
        verify_lines(lines)
    return err.value


# --------------------------------------------------------------------------- records and chain


def test_entry_round_trip_and_documented_hash_rule() -> None:
    lines = _lines(3)
    assert verify_lines(lines) == 3
    first = json.loads(lines[0])
    assert first["prev"] == GENESIS and first["seq"] == 0
    assert set(first) == {"seq", "time", "decision", "code", "who", "what", "prev", "hash"}
    assert [json.loads(line)["prev"] for line in lines[1:]] == [json.loads(line)["hash"] for line in lines[:-1]]
    for line in lines:
        # AUDIT-3 as an auditor applies it: cut out the hash member and the LF, hash the rest.
        record = json.loads(line)
        cut = line.replace(f',"hash":"{record["hash"]}"'.encode(), b"")[:-1]
        assert hashlib.sha256(cut).hexdigest() == record["hash"]
        # ... which is the canonical JSON of the record without its hash.
        del record["hash"]
        assert cut == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert verify_chain(lines).last_hash == json.loads(lines[-1])["hash"]
    assert verify_chain([]) == audit.ChainHead(0, GENESIS)


def test_make_line_equals_encode_entry_and_normalizes_text() -> None:
    fields = dict(time=5, decision="deny", code=ErrorCode.TOKEN_EXPIRED, who="é\ud800" + "x" * 300, what={"k": "v"})
    line, digest = make_line(GENESIS, 0, **fields)
    entry = make_entry(GENESIS, 0, **fields)
    assert line == encode_entry(entry) and digest == entry["hash"]
    assert entry["time"] == 5.0 and type(entry["code"]) is str and entry["code"] == "TOKEN_EXPIRED"
    assert entry["who"].startswith("é?x") and len(entry["who"]) == audit.MAX_TEXT_CHARS + 3
    assert "é".encode() in line  # UTF-8, not \\u escapes
    assert verify_lines([line]) == 1


@pytest.mark.parametrize(
    "change",
    [
        dict(decision="maybe"),
        dict(time=float("nan")),
        dict(time=10**400),
        dict(time="1"),
        dict(decision=["allow"]),
        dict(who=7),
        dict(what={"rpc": 1}),
        dict(what={str(i): "" for i in range(audit.MAX_WHAT_ITEMS + 1)}),
    ],
)
def test_make_entry_refuses_bad_fields(change: dict) -> None:
    good = dict(time=1.0, decision="allow", code="OK", who=WHO, what={})
    make_entry(GENESIS, 0, **good)
    with pytest.raises(AuditError) as err:
        make_entry(GENESIS, 0, **(good | change))
    assert err.value.code == ErrorCode.AUDIT_MALFORMED
    for prev, seq in (("f" * 63, 0), ("F" * 64, 0), (GENESIS, -1), (GENESIS, True)):
        with pytest.raises(AuditError):
            make_entry(prev, seq, **good)


def test_changed_line_is_tampered() -> None:
    lines = _lines(4)
    lines[1] = lines[1].replace(b'"decision":"allow"', b'"decision":"deny"')
    err = _verify_error(lines)
    assert (err.code, err.line) == (ErrorCode.AUDIT_TAMPERED, 2)


def test_changed_line_with_recomputed_hash_breaks_the_next_line() -> None:
    entries = _entries(4)
    forged = make_entry(entries[0]["hash"], 1, time=entries[1]["time"], decision="allow", code="OK", who="me", what={})
    lines = [encode_entry(e) for e in entries]
    lines[1] = encode_entry(forged)
    err = _verify_error(lines)
    assert (err.code, err.line) == (ErrorCode.AUDIT_BROKEN_CHAIN, 3)


def test_removed_swapped_inserted_lines_break_the_chain() -> None:
    lines = _lines(5)
    removed = lines[:2] + lines[3:]
    swapped = [lines[0], lines[2], lines[1], *lines[3:]]
    duplicated = lines[:3] + [lines[2]] + lines[3:]
    other = _lines(5, who="someone-else")[2]  # a valid line of another chain: its own hash is right
    inserted = lines[:2] + [other] + lines[2:]
    for edited, line in ((removed, 3), (swapped, 2), (duplicated, 4), (inserted, 3)):
        err = _verify_error(edited)
        assert (err.code, err.line) == (ErrorCode.AUDIT_BROKEN_CHAIN, line)
        assert err.message.startswith(f"line {line}: ")


@pytest.mark.parametrize(
    "bad",
    [
        b"not json\n",
        b"\n",
        b"[]\n",
        b'{"seq":0}\n',
        b'{"code":"OK","decision":[],"hash":"","prev":"","seq":0,"time":1.0,"what":{},"who":""}\n',
        b'{"code":"OK","decision":"allow","hash":"","prev":"","seq":0,"time":1.0,"what":{"a":1},"who":""}\n',
        b'{"code":"OK","decision":"allow","hash":"","prev":"","seq":0,"time":NaN,"what":{},"who":""}\n',
        "{\"x\":\"\xff\"}\n".encode("latin-1"),
    ],
)
def test_malformed_lines(bad: bytes) -> None:
    lines = _lines(3)
    err = _verify_error([lines[0], bad, lines[2]])
    assert (err.code, err.line) == (ErrorCode.AUDIT_MALFORMED, 2)


def test_non_canonical_or_cut_lines_are_malformed() -> None:
    lines = _lines(2)
    spaced = json.dumps(json.loads(lines[1]), sort_keys=True).encode() + b"\n"  # same record, other spacing
    assert _verify_error([lines[0], spaced]).code == ErrorCode.AUDIT_MALFORMED
    assert _verify_error([lines[0], lines[1][:-1]]).code == ErrorCode.AUDIT_MALFORMED  # torn last line
    assert _verify_error([lines[0], lines[1].replace(b"\n", b"\r\n")]).code == ErrorCode.AUDIT_MALFORMED
    record = json.loads(lines[1])
    upper = lines[1].replace(record["hash"].encode(), record["hash"].upper().encode())
    assert _verify_error([lines[0], upper]).code == ErrorCode.AUDIT_MALFORMED


def test_anchor_detects_truncation_and_rewrites() -> None:
    lines = _lines(5)
    anchor = json.loads(lines[2])["hash"]
    assert verify_chain(lines, anchor=anchor).entries == 5
    # The chain alone cannot see a cut tail ...
    assert verify_lines(lines[:2]) == 2
    # ... the anchor can.
    with pytest.raises(AuditError) as err:
        verify_chain(lines[:2], anchor=anchor)
    assert err.value.code == ErrorCode.AUDIT_BROKEN_CHAIN


# --------------------------------------------------------------------------- hypothesis: every edit is seen

_TEXT = st.text(max_size=12)
_RECORD = st.fixed_dictionaries(
    {
        "time": st.floats(min_value=0, max_value=4e9, allow_nan=False),
        "decision": st.sampled_from(["allow", "deny"]),
        "code": _TEXT,
        "who": _TEXT,
        "what": st.dictionaries(_TEXT, _TEXT, max_size=3),
    }
)


def _chain(records: list[dict]) -> list[bytes]:
    lines, prev = [], GENESIS
    for seq, fields in enumerate(records):
        line, prev = make_line(prev, seq, **fields)
        lines.append(line)
    return lines


@st.composite
def _edited_logs(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    lines = _chain(draw(st.lists(_RECORD, min_size=2, max_size=6)))
    kind = draw(st.sampled_from(["byte", "cut", "remove", "swap", "duplicate", "insert"]))
    data = b"".join(lines)
    if kind == "byte":
        at = draw(st.integers(0, len(data) - 1))
        value = draw(st.integers(0, 255).filter(lambda b: b != data[at]))
        data = data[:at] + bytes([value]) + data[at + 1 :]
    elif kind == "cut":  # bytes removed anywhere but at the very end
        start = draw(st.integers(0, len(data) - 2))
        end = draw(st.integers(start + 1, len(data) - 1))
        data = data[:start] + data[end:]
    else:
        edited = list(lines)
        i = draw(st.integers(0, len(lines) - 2))  # removing the last line is pure tail truncation
        j = draw(st.integers(i + 1, len(lines) - 1))
        if kind == "remove":
            del edited[i]
        elif kind == "swap":
            edited[i], edited[j] = edited[j], edited[i]
        elif kind == "duplicate":
            edited.insert(j, lines[i])
        else:
            stranger = _chain([draw(_RECORD)] * (i + 1))[i]  # a well-formed line at that position
            edited.insert(i, stranger)
        data = b"".join(edited)
    return lines, data.splitlines(keepends=True)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_edited_logs())
def test_any_edit_but_tail_truncation_is_detected(case: tuple[list[bytes], list[bytes]]) -> None:
    original, edited = case
    assert verify_lines(original) == len(original)
    with pytest.raises(AuditError) as err:
        verify_lines(edited)
    assert err.value.code in {ErrorCode.AUDIT_MALFORMED, ErrorCode.AUDIT_TAMPERED, ErrorCode.AUDIT_BROKEN_CHAIN}
    assert err.value.message.startswith(f"line {err.value.line}: ")
    for keep in range(len(original) + 1):  # what the chain cannot see, by design
        assert verify_lines(original[:keep]) == keep


# --------------------------------------------------------------------------- the file


def _record(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.record(decision="allow", code="OK", who=WHO, what={"rpc": "/x/Call", "model": f"m{i}"})


def test_audit_log_writes_a_verifiable_private_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    clock = iter(range(100, 200))
    log = AuditLog(path, clock=lambda: float(next(clock)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    _record(log, 2)
    log.record(decision="deny", code=ErrorCode.KEY_REVOKED, who="anonymous", what={"rpc": "/x/Setup"})
    # Each record is in the file when record() returns, without close().
    lines = path.read_bytes().splitlines(keepends=True)
    assert verify_chain(lines) == audit.ChainHead(3, log.last_hash)
    last = json.loads(lines[-1])
    assert (last["decision"], last["code"], last["who"], last["time"], last["seq"]) == (
        "deny", "KEY_REVOKED", "anonymous", 102.0, 2,
    )  # fmt: skip
    log.close()
    log.close()
    with pytest.raises(AuditError) as err:
        log.record(decision="allow", code="OK", who=WHO, what={})
    assert err.value.code == ErrorCode.AUDIT_UNAVAILABLE


def test_reopening_resumes_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _record(log, 3)
        head = log.last_hash
    with AuditLog(path) as log:
        assert (log.entries, log.last_hash) == (3, head)
        _record(log, 2)
    lines = path.read_bytes().splitlines(keepends=True)
    assert verify_lines(lines) == 5
    assert json.loads(lines[3])["prev"] == head


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path):
        with pytest.raises(AuditError) as err:
            AuditLog(path)
        assert err.value.code == ErrorCode.AUDIT_UNAVAILABLE
    AuditLog(path).close()  # free again once closed


@pytest.mark.parametrize(
    ("edit", "code", "line"),
    [
        (lambda lines: lines[:1] + lines[2:], ErrorCode.AUDIT_BROKEN_CHAIN, 2),
        (lambda lines: [lines[0], lines[1].replace(b"m1", b"m9"), lines[2]], ErrorCode.AUDIT_TAMPERED, 2),
        (lambda lines: lines[:2] + [lines[2][:20]], ErrorCode.AUDIT_MALFORMED, 3),  # torn last line
    ],
)
def test_a_broken_file_refuses_to_open(tmp_path: Path, edit, code: ErrorCode, line: int) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _record(log, 3)
    broken = b"".join(edit(path.read_bytes().splitlines(keepends=True)))
    path.write_bytes(broken)
    with pytest.raises(AuditError) as err:
        AuditLog(path)
    assert (err.value.code, err.value.line) == (code, line)
    assert str(path) in err.value.message
    assert path.read_bytes() == broken, "nothing appended to a broken log"


def test_unopenable_path_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(AuditError) as err:
        AuditLog(tmp_path / "missing-dir" / "audit.jsonl")
    assert err.value.code == ErrorCode.AUDIT_UNAVAILABLE


_FILL_UP = """
import resource, signal, sys
from pathlib import Path
from secure_runner.errors import AuditError
from secure_runner.transport.audit_log import AuditLog

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # the disk is "full" at 1000 bytes
log = AuditLog(Path(sys.argv[1]))
written = 0
for attempt in range(2):  # the failing write, then any later record
    try:
        while True:
            log.record(decision="allow", code="OK", who="w", what={"n": str(written)})
            written += 1
    except AuditError as exc:
        print(written, exc.code)
"""


def test_a_failed_write_stops_the_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    done = subprocess.run([sys.executable, "-c", _FILL_UP, str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    first, again = done.stdout.splitlines()
    written = int(first.split()[0])
    assert written > 0 and first.endswith(" AUDIT_UNAVAILABLE") and again == f"{written} AUDIT_UNAVAILABLE"
    # The torn last line is on disk; the complete ones verify, and the log refuses to reopen.
    lines = path.read_bytes().splitlines(keepends=True)
    assert verify_lines(lines[:written]) == written
    with pytest.raises(AuditError) as err:
        AuditLog(path)
    assert (err.value.code, err.value.line) == (ErrorCode.AUDIT_MALFORMED, written + 1)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(_lines(4)))
    return path


def test_cli_verify_ok(log_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = json.loads(log_file.read_bytes().splitlines()[-1])["hash"]
    assert cli.main(["audit", "verify", str(log_file)]) == 0
    assert capsys.readouterr().out == f"OK: 4 entries, last hash {last}\n"
    assert audit_cli.main(["verify", str(log_file), "--anchor", last]) == 0
    capsys.readouterr()


def test_cli_subprocess_detects_a_changed_line(log_file: Path) -> None:
    lines = log_file.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"code":"TOKEN_EXPIRED"', b'"code":"OK"')
    log_file.write_bytes(b"".join(lines))
    done = subprocess.run(
        [sys.executable, "-m", "secure_runner.cli", "audit", "verify", str(log_file)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("secure-runner audit: AUDIT_TAMPERED: line 3: ")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda lines: lines[:1] + lines[2:], "AUDIT_BROKEN_CHAIN: line 2: "),  # removed
        (lambda lines: [lines[0], lines[2], lines[1], lines[3]], "AUDIT_BROKEN_CHAIN: line 2: "),  # swapped
        (lambda lines: lines[:2] + [_lines(3, "x")[2]] + lines[2:], "AUDIT_BROKEN_CHAIN: line 3: "),  # inserted
        (lambda lines: lines[:3] + [b"{oops\n"] + lines[3:], "AUDIT_MALFORMED: line 4: "),  # malformed
        (lambda lines: [lines[0], lines[1].replace(b"m1", b"m7"), *lines[2:]], "AUDIT_TAMPERED: line 2: "),
    ],
)
def test_cli_verify_detects_edits(log_file: Path, capsys: pytest.CaptureFixture[str], edit, expected: str) -> None:
    log_file.write_bytes(b"".join(edit(log_file.read_bytes().splitlines(keepends=True))))
    assert audit_cli.main(["verify", str(log_file)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"secure-runner audit: {expected}")
    assert len(captured.err.splitlines()) == 1


def test_cli_anchor_catches_truncation(log_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_cli.main(["verify", str(log_file)]) == 0
    anchor = capsys.readouterr().out.split()[-1]
    log_file.write_bytes(b"".join(log_file.read_bytes().splitlines(keepends=True)[:3]))
    assert audit_cli.main(["verify", str(log_file)]) == 0  # the chain alone cannot tell
    capsys.readouterr()
    assert audit_cli.main(["verify", str(log_file), "--anchor", anchor]) == 1
    assert capsys.readouterr().err.startswith("secure-runner audit: AUDIT_BROKEN_CHAIN: line 3: ")


def test_cli_usage_and_io_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_cli.main(["verify", str(tmp_path / "missing.jsonl")]) == 2
    assert "AUDIT_UNAVAILABLE" in capsys.readouterr().err
    assert audit_cli.main(["verify", str(tmp_path), "--anchor", "xyz"]) == 2
    assert audit_cli.main([]) == 2
    assert "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------------------- bounded size, bounded start, anchors


def _segments(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".0*"))


def test_identical_refusals_are_counted_not_repeated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, aggregate_seconds=60) as log:
        for i in range(500):
            log.record(decision="deny", code="PEER_UNAUTHENTICATED", who="spiffe://c1/runner/r", what={"rpc": f"/x/{i}"})
            if i % 100 == 0:
                log.record(decision="allow", code="OK", who=WHO, what={"rpc": "/x/Call"})  # never counted
        log.record(decision="deny", code="TOKEN_EXPIRED", who="spiffe://c1/runner/r", what={"rpc": "/x/Call"})
        assert len(path.read_bytes().splitlines()) == 1 + 5 + 1  # the first refusal of each kind, the allows
        # That peer allowed now: its counted refusals are written first, in order, and a new window starts.
        log.record(decision="allow", code="OK", who="spiffe://c1/runner/r", what={"rpc": "/x/Call"})
        log.record(decision="deny", code="TOKEN_EXPIRED", who="spiffe://c1/runner/r", what={"rpc": "/x/Call"})
        log.record(decision="deny", code="TOKEN_EXPIRED", who="spiffe://c1/runner/r", what={"rpc": "/x/Call"})
    entries = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [(e["decision"], e["code"], e["what"].get("repeats")) for e in entries[-4:]] == [
        ("deny", "PEER_UNAUTHENTICATED", "499"), ("allow", "OK", None), ("deny", "TOKEN_EXPIRED", None),
        ("deny", "TOKEN_EXPIRED", "1"),
    ]
    assert entries[-4]["what"]["rpc"] == "/x/499"
    assert audit_cli.main(["verify", str(path)]) == 0
    assert f"OK: {len(entries)} entries" in capsys.readouterr().out


def test_a_counting_window_ends_on_time_without_new_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, aggregate_seconds=0.1) as log:
        for _ in range(3):
            log.record(decision="deny", code="KEY_REVOKED", who=WHO, what={"rpc": "/x/Call"})
        deadline = time.monotonic() + 5
        while len(path.read_bytes().splitlines()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        last = json.loads(path.read_bytes().splitlines()[-1])
        assert (last["code"], last["what"]["repeats"]) == ("KEY_REVOKED", "2")


def test_the_log_rotates_into_segments_that_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, segment_bytes=2_000) as log:
        _record(log, 40)
    with AuditLog(path, segment_bytes=2_000) as log:  # reopens on the live segment only
        assert log.entries == 40
        _record(log, 10)
    segments = _segments(path)
    assert len(segments) >= 5 and all(s.stat().st_size >= 2_000 for s in segments)
    previous_hash, seq = GENESIS, 0
    for segment in [*segments, path]:
        lines = segment.read_bytes().splitlines(keepends=True)
        first = json.loads(lines[0]) if lines else None
        if first is not None:
            assert (first["seq"], first["prev"]) == (seq, previous_hash)
            assert segment == path or segment.name == f"audit.jsonl.{seq:012d}"
            previous_hash, seq = json.loads(lines[-1])["hash"], seq + len(lines)
    assert seq == 50
    assert audit_cli.main(["verify", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"OK: 50 entries, last hash {previous_hash}\n")
    # A line removed from an old segment is found, and named within its segment.
    victim = segments[1]
    lines = victim.read_bytes().splitlines(keepends=True)
    victim.write_bytes(b"".join(lines[:1] + lines[2:]))
    assert audit_cli.main(["verify", str(path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("secure-runner audit: AUDIT_BROKEN_CHAIN: line 2: ") and f"(in {victim.name})" in error


def test_start_time_does_not_grow_with_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A live file over the segment size is not read through at start: only its last line is checked."""
    path = tmp_path / "audit.jsonl"
    lines = _lines(200)
    lines[50] = lines[50].replace(b"m50", b"m5X")  # found by `audit verify`, not by a bounded start
    path.write_bytes(b"".join(lines))
    with AuditLog(path, segment_bytes=4_096) as log:
        assert (log.entries, log.last_hash) == (200, json.loads(lines[-1])["hash"])
        log.record(decision="allow", code="OK", who=WHO, what={})
    assert _segments(path) == [path.with_name("audit.jsonl.000000000000")]
    assert audit_cli.main(["verify", str(path)]) == 1
    assert capsys.readouterr().err.startswith("secure-runner audit: AUDIT_TAMPERED: line 51: ")
    # Its last line is checked: a torn or changed last line still refuses the start.
    path.unlink()
    _segments(path)[0].rename(path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(AuditError) as err:
        AuditLog(path, segment_bytes=4_096)
    assert err.value.code == ErrorCode.AUDIT_MALFORMED


def test_signed_checkpoints_catch_truncation_and_rewrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _record(log, 6)
        key = audit.key_text(log.public_key)
        private = bytes(log._signing_key)
    checkpoints = path.with_name("audit.jsonl.checkpoints")
    assert [json.loads(line)["entries"] for line in checkpoints.read_bytes().splitlines()] == [0, 6]
    assert stat.S_IMODE(checkpoints.stat().st_mode) == 0o600
    assert all(private not in f.read_bytes() for f in tmp_path.iterdir())  # the signing key is never written
    assert audit_cli.main(["verify", str(path), f"--key={key}"]) == 0
    assert capsys.readouterr().out.endswith(f"checkpoint key: {key}\n")
    original = path.read_bytes()

    def verdict() -> str:
        assert audit_cli.main(["verify", str(path)]) == 1
        return capsys.readouterr().err

    # Cut the tail: the chain alone still verifies; the checkpoint says 6 records were signed.
    path.write_bytes(b"".join(original.splitlines(keepends=True)[:4]))
    assert verify_lines(path.read_bytes().splitlines(keepends=True)) == 4
    error = verdict()
    assert "AUDIT_BROKEN_CHAIN" in error and "truncated after a checkpoint" in error
    # Rewrite from line 3 on, every hash recomputed: the chain verifies, the signed head does not match.
    entries = [json.loads(line) for line in original.splitlines()]
    entries[2]["who"] = "someone else"
    rewritten, prev = [], entries[1]["hash"]
    for entry in entries[2:]:
        fields = {k: entry[k] for k in ("time", "decision", "code", "who", "what")}
        line, prev = make_line(prev, entry["seq"], **fields)
        rewritten.append(line)
    path.write_bytes(b"".join(original.splitlines(keepends=True)[:2] + rewritten))
    assert verify_lines(path.read_bytes().splitlines(keepends=True)) == 6
    error = verdict()
    assert "AUDIT_BROKEN_CHAIN" in error and "rewritten after it was signed" in error
    # A checkpoint changed to match is no longer signed; one signed by another key is refused with --key.
    path.write_bytes(b"".join(original.splitlines(keepends=True)[:2] + rewritten))
    signed = checkpoints.read_bytes().splitlines(keepends=True)
    forged = json.loads(signed[-1])
    forged["hash"] = prev
    checkpoints.write_bytes(signed[0] + json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    assert "AUDIT_TAMPERED" in verdict()
    path.write_bytes(original)
    checkpoints.write_bytes(b"".join(signed))
    with AuditLog(path) as log:  # a new run, a new key
        _record(log, 1)
    assert audit_cli.main(["verify", str(path), f"--key={key}"]) == 1
    assert capsys.readouterr().err.startswith("secure-runner audit: AUDIT_TAMPERED: checkpoint line 3: ")
