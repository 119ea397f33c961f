"""A cruncher's identity key, and the delegations it signs for its runners, on the cruncher's machine.

The identity key is either one made here (`identity.key`, PKCS#8, 0600) or the
cruncher's existing Solana wallet: the keypair file Solana's tools write, a JSON array
of 64 bytes, the 32-byte Ed25519 seed then the 32-byte public key (the pair is checked
to match before anything is signed with it). A delegation (smp/token.py) says "this
runner TLS key may serve my model until then"; the cruncher signs it for the key in
the runner's certificate or CSR, which is all it needs from the runner host, and sends
the token back. Neither the orchestrator nor the operator ever holds this key.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.signing import SigningKey

from secure_runner import pki
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.provisioning import certs
from secure_runner.provisioning.public import CruncherPublic
from secure_runner.smp.token import MAX_DELEGATION_LIFETIME, issue_delegation

WALLET_BYTES = 64
IDENTITY_FILE = "identity.key"


def load_solana_keypair(path: Path | str) -> Ed25519PrivateKey:
    """The Ed25519 key of a Solana keypair file (`solana-keygen` format); PKI_INVALID unless seed and public key match."""
    try:
        values = json.loads(pki.read_file(path, "wallet keypair"))
    except ValueError:
        raise ConfigError(ErrorCode.PKI_INVALID, f"{path} is not JSON; expected a Solana keypair file") from None
    if (
        not isinstance(values, list) or len(values) != WALLET_BYTES
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values)
    ):  # fmt: skip
        raise ConfigError(ErrorCode.PKI_INVALID, f"{path} is not a Solana keypair file (a JSON array of 64 bytes)")
    raw = bytes(values)
    key = Ed25519PrivateKey.from_private_bytes(raw[:32])
    if pki.public_key_raw(key) != raw[32:]:
        raise ConfigError(ErrorCode.PKI_INVALID, f"{path}: the public key does not belong to the seed")
    return key


def load_identity(folder: Path | None, wallet: Path | None) -> Ed25519PrivateKey:
    """The cruncher's key: its Solana wallet if given, else `identity.key` in its folder."""
    if wallet is not None:
        return load_solana_keypair(wallet)
    if folder is None:
        raise ConfigError(ErrorCode.PKI_INVALID, "give the cruncher's folder (--dir) or its wallet keypair (--wallet)")
    return pki.load_identity_key(folder / IDENTITY_FILE)


def create_identity(folder: Path) -> Ed25519PrivateKey:
    path = folder / IDENTITY_FILE
    if path.exists():
        raise ConfigError(ErrorCode.PKI_INVALID, f"{path} exists; a cruncher's identity is made once")
    key = pki.generate_identity_key()
    pki.write_private_key(path, key)
    return key


def public_material(cruncher_id: str, key: Ed25519PrivateKey) -> CruncherPublic:
    raw = pki.public_key_raw(key)
    try:  # the base58 address is a convenience for Solana users; the registry needs only the base64 key
        from solders.pubkey import Pubkey

        wallet = str(Pubkey.from_bytes(raw))
    except ImportError:
        wallet = ""
    return CruncherPublic(cruncher_id=cruncher_id, public_key=pki.b64(raw), wallet=wallet)


def runner_key_hash(pem: bytes) -> str:
    """The SPKI hash a delegation binds, from the runner's certificate or CSR (whose signature must verify)."""
    if b"CERTIFICATE REQUEST" in pem:
        return certs.spki_sha256_b64url(certs.load_csr(pem).public_key())
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ConfigError(ErrorCode.PKI_INVALID, "expected the runner's PEM certificate or CSR") from None
    return certs.spki_sha256_b64url(cert.public_key())


def sign_delegation(key: Ed25519PrivateKey, crunch_id: str, model_id: str, runner_pem: bytes, days: int) -> bytes:
    """The cruncher's delegation of `model_id` to the runner key in `runner_pem`, valid `days` days from now."""
    lifetime = pki.check_days(days, "delegation validity") * 86400
    if lifetime > MAX_DELEGATION_LIFETIME:
        raise ConfigError(ErrorCode.PKI_INVALID, f"a delegation lasts at most {MAX_DELEGATION_LIFETIME // 86400} days")
    pki.validate_id(crunch_id, "crunch id")
    pki.validate_id(model_id, "model id")
    return issue_delegation(
        SigningKey(key.private_bytes_raw()), crunch_id=crunch_id, model_id=model_id,
        spki_sha256=runner_key_hash(runner_pem), now=int(time.time()), lifetime=lifetime,
    )  # fmt: skip


# --------------------------------------------------------------------------- CLI: secure-runner pki cruncher ...


def add_commands(group: argparse._SubParsersAction) -> None:
    parser = group.add_parser("cruncher", help="cruncher: your identity key (or Solana wallet), delegations for runners")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=type(parser))
    init = verbs.add_parser("init", help="make an identity key in DIR (or skip this and use --wallet)")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--id", required=True, dest="cruncher_id", metavar="CRUNCHER_ID")
    init.add_argument("--public-out", type=Path, help="also write the public material to this file (JSON)")
    init.set_defaults(func=_init)
    public = verbs.add_parser("public", help="print the public key to register")
    delegate = verbs.add_parser("delegate", help="sign a delegation of one model to a runner's TLS key")
    for verb in (public, delegate):
        source = verb.add_mutually_exclusive_group(required=True)
        source.add_argument("--dir", type=Path, help="folder holding identity.key")
        source.add_argument("--wallet", type=Path, help="a Solana keypair file (JSON array of 64 bytes)")
    public.add_argument("--id", required=True, dest="cruncher_id", metavar="CRUNCHER_ID")
    public.add_argument("--public-out", type=Path)
    public.set_defaults(func=_public)
    delegate.add_argument("--crunch", required=True, metavar="ID")
    delegate.add_argument("--model", required=True, metavar="MODEL_ID")
    runner = delegate.add_mutually_exclusive_group(required=True)
    runner.add_argument("--runner-cert", type=Path, help="the runner's certificate")
    runner.add_argument("--runner-csr", type=Path, help="the runner's CSR")
    delegate.add_argument("--days", type=int, default=7, metavar="N", help="validity, at most 31 days (default 7)")
    delegate.add_argument("--out", type=Path, required=True, help="where to write the delegation (public)")
    delegate.set_defaults(func=_delegate)


def _show(material: CruncherPublic, out: Path | None) -> int:
    text = material.model_dump_json(indent=2)
    if out:
        pki.write_public_file(out, (text + "\n").encode(), "public material to register (JSON)")
    print(text)
    return 0


def _init(args: argparse.Namespace) -> int:
    return _show(public_material(args.cruncher_id, create_identity(args.dir)), args.public_out)


def _public(args: argparse.Namespace) -> int:
    return _show(public_material(args.cruncher_id, load_identity(args.dir, args.wallet)), args.public_out)


def _delegate(args: argparse.Namespace) -> int:
    runner_pem = pki.read_file(args.runner_cert or args.runner_csr, "runner certificate or CSR")
    token = sign_delegation(load_identity(args.dir, args.wallet), args.crunch, args.model, runner_pem, args.days)
    pki.write_public_file(args.out, token, f"delegation of model {args.model} to a runner key")
    print(f"delegated model {args.model!r} to runner key {runner_key_hash(runner_pem)} for {args.days} days -> {args.out}")
    return 0
