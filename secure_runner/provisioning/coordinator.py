"""A coordinator's own keys (and, the same way, an operator's): made on its machine, never sent anywhere.

The folder is the coordinator's home, laid out like a `pki init` folder so that
`CoordinatorSecurity.from_pki_dir(home)` uses it as is:

    home/ca.crt, home/registry.json           public, installed from the operator
    home/coordinator/identity.key             Ed25519 token-signing key (0600)
    home/coordinator/tls.key, tls.csr, tls.crt    P-256 TLS key (0600), its CSR, the signed certificate
    home/coordinator/next/...                 a rotation in progress (same files)
    home/coordinator/previous/...             the set a rotation replaced, still registered during the overlap

The TLS certificate's id is the signing key's id (pki.key_id_for), so both are made
together and rotate together. What is printed for registration is public: per key
set, its key id, Ed25519 public key and the certificate hash a chain registry stores
(SHA-256 of the TLS key's SubjectPublicKeyInfo).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_runner import pki
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.provisioning import ca, certs
from secure_runner.provisioning.public import SignerKey, SignerPublic
from secure_runner.smp.identity import PeerIdentity, Role

SIGNER_ROLES = (Role.COORDINATOR, Role.OPERATOR)


@dataclass(frozen=True)
class KeySet:
    """One signing key with the TLS key and certificate that name it."""

    folder: Path

    identity_key = property(lambda self: self.folder / "identity.key")
    tls_key = property(lambda self: self.folder / "tls.key")
    tls_csr = property(lambda self: self.folder / "tls.csr")
    tls_cert = property(lambda self: self.folder / "tls.crt")
    files = property(lambda self: (self.identity_key, self.tls_key, self.tls_csr, self.tls_cert))

    def exists(self) -> bool:
        return self.identity_key.is_file()

    def key_id(self) -> str:
        return pki.key_id_for(pki.public_key_raw(pki.load_identity_key(self.identity_key)))

    def public(self) -> SignerKey:
        tls_key = pki.load_private_key(self.tls_key)
        return SignerKey(
            key_id=self.key_id(),
            public_key=pki.b64(pki.public_key_raw(pki.load_identity_key(self.identity_key))),
            cert_hash=certs.spki_sha256_hex(tls_key.public_key()),
        )

    def create(self, crunch_id: str, role: Role) -> None:
        """A new signing key, a new TLS key, and the CSR asking for `spiffe://<crunch>/<role>/<key id>`."""
        if self.exists():
            raise ConfigError(ErrorCode.PKI_INVALID, f"{self.folder} already holds keys; use `rotate` for new ones")
        identity_key = pki.generate_identity_key()
        tls_key = certs.generate_tls_key()
        key_id = pki.key_id_for(pki.public_key_raw(identity_key))
        csr = certs.make_csr(tls_key, PeerIdentity.make(crunch_id, role, key_id))
        pki.write_private_key(self.identity_key, identity_key)
        pki.write_private_key(self.tls_key, tls_key)
        pki.write_public_file(self.tls_csr, csr.public_bytes(Encoding.PEM), "certificate signing request")


@dataclass(frozen=True)
class SignerHome:
    """A coordinator's (or operator's) home folder; see the module docstring."""

    root: Path
    role: Role = Role.COORDINATOR

    @property
    def current(self) -> KeySet:
        return KeySet(self.root / str(self.role))

    @property
    def next(self) -> KeySet:
        return KeySet(self.current.folder / "next")

    @property
    def previous(self) -> KeySet:
        return KeySet(self.current.folder / "previous")

    def init(self, crunch_id: str) -> SignerPublic:
        self.current.create(crunch_id, self.role)
        return self.public()

    def rotate(self, crunch_id: str) -> SignerPublic:
        """A new key set beside the current one; both are to be registered until the new certificate is installed."""
        if not self.current.exists():
            raise ConfigError(ErrorCode.PKI_INVALID, f"nothing to rotate in {self.root}; run `init` first")
        self.next.create(crunch_id, self.role)
        return self.public()

    def public(self) -> SignerPublic:
        """Every key set present (current, next, previous): all of them stay registered during an overlap."""
        sets = [s for s in (self.current, self.next, self.previous) if s.exists()]
        if not sets:
            raise ConfigError(ErrorCode.PKI_INVALID, f"no keys in {self.root}; run `init` first")
        return SignerPublic(role=self.role, keys=[s.public() for s in sets])

    def install(self, cert: x509.Certificate, ca_cert: x509.Certificate, registry: bytes | None = None) -> Path:
        """Install a certificate the operator signed for one of our key sets, after checking it (CERT_NOT_ISSUED_FOR_US).

        It must validate against the crunch CA, name this role and that set's key id, and
        certify that set's TLS key. A certificate for the `next` set completes a rotation:
        the current set moves to `previous` and `next` becomes current.
        """
        crunch_id = ca.crunch_of(ca_cert)
        for key_set in (self.current, self.next):
            if not key_set.exists():
                continue
            tls_key = pki.load_private_key(key_set.tls_key)
            if certs.spki_der(cert.public_key()) != certs.spki_der(tls_key.public_key()):
                continue
            identity = PeerIdentity.make(crunch_id, self.role, key_set.key_id())
            certs.verify_leaf(cert, ca_cert, identity, key=tls_key)  # type: ignore[arg-type]
            if key_set == self.next:
                self._promote_next()
            pki.write_certificate(self.root / "ca.crt", ca_cert)
            if registry is not None:
                pki.write_registry(self.root / "registry.json", registry)
            pki.write_certificate(self.current.tls_cert, cert)
            return self.current.tls_cert
        raise ConfigError(ErrorCode.CERT_NOT_ISSUED_FOR_US, f"the certificate is not for any TLS key in {self.current.folder}")

    def _promote_next(self) -> None:
        """current -> previous (replacing an older previous), next -> current."""
        self.previous.folder.mkdir(mode=0o700, exist_ok=True)
        for older, current, upcoming in zip(self.previous.files, self.current.files, self.next.files, strict=True):
            older.unlink(missing_ok=True)
            if current.exists():
                os.replace(current, older)
            if upcoming.exists():
                os.replace(upcoming, current)
        self.next.folder.rmdir()


# --------------------------------------------------------------------------- CLI: secure-runner pki coordinator|operator ...


def add_commands(group: argparse._SubParsersAction, role: Role) -> None:
    parser = group.add_parser(
        str(role), help=f"{role}: make your signing and TLS keys here, print what to register, install your certificate",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=type(parser))
    init = verbs.add_parser("init", help="make the signing key, TLS key and CSR in DIR; print the public material")
    rotate = verbs.add_parser("rotate", help="make a new key set beside the current one (register both)")
    for verb in (init, rotate):
        verb.add_argument("--dir", type=Path, required=True)
        verb.add_argument("--crunch", required=True, metavar="ID")
        verb.add_argument("--public-out", type=Path, help="also write the public material to this file (JSON)")
    init.set_defaults(func=lambda args: _print(SignerHome(args.dir, role).init(args.crunch), args, role))
    rotate.set_defaults(func=lambda args: _print(SignerHome(args.dir, role).rotate(args.crunch), args, role))
    public = verbs.add_parser("public", help="print the public material of every key set in DIR")
    public.add_argument("--dir", type=Path, required=True)
    public.add_argument("--public-out", type=Path)
    public.set_defaults(func=lambda args: _print(SignerHome(args.dir, role).public(), args, role))
    install = verbs.add_parser("install", help="check and install the certificate the operator signed")
    install.add_argument("--dir", type=Path, required=True)
    install.add_argument("--cert", type=Path, required=True)
    install.add_argument("--ca", type=Path, required=True, help="the crunch CA certificate")
    install.add_argument("--registry", type=Path, help="the crunch's registry file, installed beside it")
    install.set_defaults(func=lambda args: _install(args, role))


def _print(material: SignerPublic, args: argparse.Namespace, role: Role) -> int:
    text = material.model_dump_json(indent=2)
    if args.public_out:
        pki.write_public_file(args.public_out, (text + "\n").encode(), "public material to register (JSON)")
    home = SignerHome(args.dir, role)
    print(text)
    if home.current.tls_csr.is_file() and not home.current.tls_cert.is_file():
        print(f"send {home.current.tls_csr} and the public material above to the crunch operator", flush=True)
    if home.next.exists():
        print(f"send {home.next.tls_csr} too: both key sets stay registered until the new certificate is installed")
    return 0


def _install(args: argparse.Namespace, role: Role) -> int:
    registry = pki.read_file(args.registry, "registry") if args.registry else None
    path = SignerHome(args.dir, role).install(pki.load_certificate(args.cert), pki.load_certificate(args.ca), registry)
    print(f"installed {certs.uri_sans(pki.load_certificate(path))[0]} -> {path}")
    return 0
