"""The crunch operator builds `registry.json` from public material only.

Inputs are the files the parties printed (`pki coordinator|operator init --public-out`,
`pki cruncher init|public --public-out`) and the model list; nothing here reads or
could accept a private key (the public files are parsed strictly, provisioning/public.py).
Every key set of a coordinator's file is registered: during a rotation that is both
the old and the new key, and the operator drops the old one by rebuilding without it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from secure_runner import pki
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.provisioning import public
from secure_runner.smp.identity import Role
from secure_runner.smp.registry import CoordinatorKey, CrunchEntry, ModelEntry, Registry


def build(
    crunch_id: str,
    *,
    signers: Sequence[public.SignerPublic],
    crunchers: Sequence[public.CruncherPublic],
    models: Sequence[pki.ModelSpec],
    days: int = 30,
) -> Registry:
    """A registry for one crunch; signing keys are valid from now (less the clock skew) for `days` days."""
    pki.validate_id(crunch_id, "crunch id")
    pki.check_days(days, "registered key validity")
    cruncher_names = pki.validate_models(models)
    keys = {c.cruncher_id: c.public_key for c in crunchers}
    if len(keys) != len(crunchers):
        raise ConfigError(ErrorCode.REGISTRY_AMBIGUOUS, "a cruncher's public material is given twice")
    unknown = sorted(set(cruncher_names) - set(keys))
    if unknown:
        raise ConfigError(ErrorCode.PKI_INVALID, f"no public key given for cruncher(s) {', '.join(unknown)}")
    now = pki.utc_now()

    def registered(role: Role) -> list[CoordinatorKey]:
        return [
            CoordinatorKey(key_id=k.key_id, public_key=k.public_key, not_before=now - pki.CLOCK_SKEW,
                           not_after=now + timedelta(days=days))
            for signer in signers if signer.role is role for k in signer.keys
        ]  # fmt: skip

    entry = CrunchEntry(
        coordinators=registered(Role.COORDINATOR),
        operators=registered(Role.OPERATOR),
        models=[
            ModelEntry(model_id=m.model_id, model_name=m.model_name, cruncher_id=m.cruncher_id,
                       cruncher_name=m.cruncher_name, identity_public_key=keys.get(m.cruncher_id))
            for m in models
        ],
    )  # fmt: skip
    return Registry(version=1, crunches={crunch_id: entry})


# --------------------------------------------------------------------------- CLI: secure-runner pki registry build


def add_commands(group: argparse._SubParsersAction, parse_model) -> None:
    parser = group.add_parser("registry", help="crunch operator: build registry.json from public material only")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=type(parser))
    build_cmd = verbs.add_parser("build", help="write registry.json from the parties' public files and the models")
    build_cmd.add_argument("--crunch", required=True, metavar="ID")
    build_cmd.add_argument("--signer", type=Path, action="append", default=[], metavar="PUBLIC.json",
                           help="a coordinator's or operator's public file (repeatable)")
    build_cmd.add_argument("--cruncher", type=Path, action="append", default=[], metavar="PUBLIC.json",
                           help="a cruncher's public file (repeatable)")
    build_cmd.add_argument("--model", type=parse_model, action="append", default=[],
                           metavar="ID[:NAME[:CRUNCHER_ID[:CRUNCHER_NAME]]]", help="repeatable")
    build_cmd.add_argument("--days", type=int, default=30, metavar="N", help="signing key validity (default 30)")
    build_cmd.add_argument("--out", type=Path, required=True)
    build_cmd.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    signers = [public.load(public.SignerPublic, pki.read_file(p, "public file"), str(p)) for p in args.signer]
    crunchers = [public.load(public.CruncherPublic, pki.read_file(p, "public file"), str(p)) for p in args.cruncher]
    registry = build(args.crunch, signers=signers, crunchers=crunchers, models=args.model, days=args.days)
    pki.write_registry(args.out, registry)
    entry = registry.crunches[args.crunch]
    print(f"wrote {args.out}: {len(entry.coordinators)} coordinator key(s), {len(entry.operators)} operator key(s), "
          f"{len(entry.models)} model(s)")
    return 0
