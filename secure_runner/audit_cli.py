"""`secure-runner audit verify FILE [--anchor HASH] [--key=KEY]...`: check an audit log.

Checks the whole log: its rotated segments `FILE.<seq>` oldest first, then the
live `FILE`, as one hash chain (AUDIT-1..4), and the signed checkpoints in
`FILE.checkpoints` against it (AUDIT-5, 6: a log cut or rewritten after a
checkpoint fails). Exit 0 and `OK: N entries, last hash <hex>` when it verifies
(record that hash somewhere else: it anchors everything up to now, see
`smp.audit`), followed by one line per checkpoint key seen; exit 1 and one line
`secure-runner audit: <CODE>: line K: ...` when it does not (naming the segment
unless it is FILE); exit 2 when it cannot be checked (usage error, unreadable file).
"""

from __future__ import annotations

import argparse
import bisect
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from secure_runner.errors import AuditError, ErrorCode
from secure_runner.smp.audit import ChainHead, parse_checkpoints, verify_chain
from secure_runner.transport.audit_log import checkpoint_file, read_lines, segment_files

_PROG = "secure-runner audit"


def _anchor(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise argparse.ArgumentTypeError("an anchor is a hash printed by `audit verify`: 64 lowercase hex digits")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description="Check secure-runner audit logs.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify",
        help="check that no line of an audit log was changed, removed, inserted or moved",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("file", metavar="FILE", type=Path)
    verify.add_argument(
        "--anchor", metavar="HASH", type=_anchor, help="a last hash recorded earlier: it must still be in the chain"
    )
    verify.add_argument(
        "--key", metavar="KEY", action="append",
        help="a checkpoint public key the writer logged, written --key=KEY (a base64url key may start with"
        " '-', which argparse would take for an option); repeatable: checkpoints signed by others are refused",
    )
    return parser


def verify_log(path: Path, *, anchor: str | None = None, keys: list[str] | None = None) -> tuple[ChainHead, list[str]]:
    """Verify the segments of the log at `path` as one chain, and its checkpoints; the head and the keys seen.

    An `AuditError` names the line within its segment, and the segment when it is not `path`.
    """
    checkpoints_path = checkpoint_file(path)
    checkpoints = []
    if checkpoints_path.exists():
        with checkpoints_path.open("rb") as file:
            checkpoints = parse_checkpoints(read_lines(file), keys=keys)
    segments = [*segment_files(path), path]
    starts: list[int] = []  # how many lines come before each segment

    def lines() -> Iterator[bytes]:
        count = 0
        for segment in segments:
            starts.append(count)
            with segment.open("rb") as file:
                for line in read_lines(file):
                    count += 1
                    yield line

    try:
        head = verify_chain(lines(), anchor=anchor, checkpoints=checkpoints)
    except AuditError as exc:
        if exc.line is None or len(segments) == 1:
            raise
        index = max(bisect.bisect_left(starts, exc.line) - 1, 0)
        local = exc.line - starts[index]
        message = exc.message.replace(f"line {exc.line}:", f"line {local}:", 1)
        where = "" if segments[index] == path else f" (in {segments[index].name})"
        raise AuditError(exc.code, message + where, line=local) from None
    return head, list(dict.fromkeys(c.key for c in checkpoints))


def main(argv: list[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exc:  # usage error (argparse printed it) or --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        head, keys = verify_log(args.file, anchor=args.anchor, keys=args.key)
    except AuditError as exc:
        print(f"{_PROG}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        reason = exc.strerror or exc
        print(f"{_PROG}: {ErrorCode.AUDIT_UNAVAILABLE}: cannot read {args.file}: {reason}", file=sys.stderr)
        return 2
    print(f"OK: {head.entries} entries, last hash {head.last_hash}")
    for key in keys:
        print(f"checkpoint key: {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
