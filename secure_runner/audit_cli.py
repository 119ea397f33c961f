"""`secure-runner audit verify FILE [--anchor HASH]`: check an audit log's hash chain.

Exit 0 and `OK: N entries, last hash <hex>` when the chain verifies (record that
hash somewhere else: it anchors everything up to now, see `smp.audit`); exit 1
and one line `secure-runner audit: <CODE>: line K: ...` when it does not; exit 2
when it cannot be checked (usage error, unreadable file).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from secure_runner.errors import AuditError, ErrorCode
from secure_runner.smp.audit import verify_chain
from secure_runner.transport.audit_log import read_lines

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
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exc:  # usage error (argparse printed it) or --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with args.file.open("rb") as file:
            head = verify_chain(read_lines(file), anchor=args.anchor)
    except AuditError as exc:
        print(f"{_PROG}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        reason = exc.strerror or exc
        print(f"{_PROG}: {ErrorCode.AUDIT_UNAVAILABLE}: cannot read {args.file}: {reason}", file=sys.stderr)
        return 2
    print(f"OK: {head.entries} entries, last hash {head.last_hash}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
