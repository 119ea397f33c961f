"""The crunch operator's CA: create it, sign CSRs under a fixed policy, renew, and log every issuance.

The CA never creates, receives or loads a leaf's private key: it issues from the public
key of a CSR (whose self-signature proves the requester holds the key), or, on renewal,
from the public key of a certificate it issued before. The policy, checked before
anything is signed (`check_request`, pure):

* CA-1 the CSR parses and its signature verifies.                         CSR_INVALID
* CA-2 its key is ECDSA P-256 (gRPC's TLS stack, see pki.py).              CSR_KEY_REFUSED
* CA-3 what it asks for is exactly what the operator approved: its SANs
       are one URI SAN, the approved `spiffe://<crunch>/<role>/<id>`, and
       at most the matching DNS SAN, nothing else.                         CSR_IDENTITY_REFUSED
* CA-4 the validity is 1..MAX_LEAF_DAYS days (and never past the CA's).    CSR_VALIDITY_REFUSED
* CA-5 the certificate's names come from the approval, never the CSR: the
       subject, one URI SAN and one DNS SAN (`<id>.<role>.<crunch>.invalid`,
       what clients pin); no CSR extension is copied.
* CA-6 key usage per role (`ROLE_EKU`): coordinators and operators only
       ever connect (clientAuth); orchestrators and runners serve
       (serverAuth) and connect (clientAuth: the orchestrator calls runners,
       and a runner's certificate presented as a client must reach
       authorization, which refuses it by its role).

The crunch is the CA's own (its subject O): a CA signs for one crunch only. An
approval is given on the command line (`secure-runner pki ca sign --role R --id I`).
Every certificate issued is appended to `issued.jsonl` in the CA's folder (public data:
serial, SPIFFE id, key hash, dates), which `secure-runner pki ca list` prints.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secure_runner import pki
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.provisioning import certs
from secure_runner.smp.identity import PeerIdentity, Role

MAX_LEAF_DAYS = 31  # a leaked leaf dies on its own within a month; delegations are bounded the same (smp/token.py)
ROLE_EKU: dict[Role, tuple[x509.ObjectIdentifier, ...]] = {
    Role.COORDINATOR: (ExtendedKeyUsageOID.CLIENT_AUTH,),
    Role.OPERATOR: (ExtendedKeyUsageOID.CLIENT_AUTH,),
    Role.ORCHESTRATOR: (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    Role.RUNNER: (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
}
ISSUED_LOG = "issued.jsonl"
_CN_MAX = 64  # ub-common-name (RFC 5280); cryptography refuses longer.


@dataclass(frozen=True)
class Approval:
    """What the operator approves for one CSR: an identity of its crunch, for so many days."""

    identity: PeerIdentity
    days: int = 7


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=not ca, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def create_ca(crunch_id: str, *, days: int = 30) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed P-256 CA for `crunch_id`, allowed to issue leaves only (path_length=0)."""
    pki.validate_id(crunch_id, "crunch id")
    pki.check_days(days, "CA validity")
    key = certs.generate_tls_key()
    common_name = f"secure-runner CA {crunch_id}"
    if len(common_name) > _CN_MAX:  # the crunch id is always in O as well
        common_name = "secure-runner CA"
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, crunch_id), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )
    now = pki.utc_now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - pki.CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _check_ca_pair(ca_cert: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes) -> None:
    if certs.spki_der(ca_cert.public_key()) != certs.spki_der(ca_key.public_key()):
        raise ConfigError(ErrorCode.PKI_INVALID, "the CA private key does not match the CA certificate")
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(ErrorCode.PKI_INVALID, "the CA certificate is not a CA (BasicConstraints ca=False)")


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())


def crunch_of(ca_cert: x509.Certificate) -> str:
    """The crunch a CA signs for: its subject O, as `create_ca` writes it."""
    orgs = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(orgs) != 1 or not isinstance(orgs[0].value, str):
        raise ConfigError(ErrorCode.PKI_INVALID, "the CA certificate does not name its crunch (subject O)")
    return pki.validate_id(orgs[0].value, "crunch id")


def check_request(csr: x509.CertificateSigningRequest, approval: Approval) -> ec.EllipticCurvePublicKey:
    """CA-1..CA-4: the CSR's key if the CSR may be signed under `approval`; a typed ConfigError otherwise."""
    if not csr.is_signature_valid:
        raise ConfigError(ErrorCode.CSR_INVALID, "the CSR's signature does not verify")
    key = _p256(csr.public_key())
    identity = approval.identity
    try:
        asked = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        asked = []
    uris = [name.value for name in asked if isinstance(name, x509.UniformResourceIdentifier)]
    others = [name for name in asked if not isinstance(name, x509.UniformResourceIdentifier)]
    if uris != [identity.spiffe_id] or any(name != x509.DNSName(identity.tls_server_name) for name in others):
        shown = ", ".join(str(name.value) for name in asked)[:300] or "nothing"
        raise ConfigError(
            ErrorCode.CSR_IDENTITY_REFUSED,
            f"the CSR asks for {shown}; the operator approved exactly {identity.spiffe_id}",
        )
    _check_validity(approval.days)
    return key


def _p256(key: object) -> ec.EllipticCurvePublicKey:
    """CA-2."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(ErrorCode.CSR_KEY_REFUSED, f"leaf keys must be ECDSA P-256, not {type(key).__name__}")
    return key


def _check_validity(days: int) -> None:
    """CA-4 (the CA's own expiry is applied when issuing)."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_LEAF_DAYS:
        raise ConfigError(ErrorCode.CSR_VALIDITY_REFUSED, f"validity must be 1..{MAX_LEAF_DAYS} days, got {days!r}")


def issue_for_key(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    public_key: ec.EllipticCurvePublicKey,
    identity: PeerIdentity,
    days: int,
) -> x509.Certificate:
    """CA-5, CA-6: a leaf for `public_key` naming `identity` (already approved), cut at the CA's expiry."""
    identity = PeerIdentity.make(identity.crunch_id, identity.role, identity.ident)
    _check_ca_pair(ca_cert, ca_key)
    if identity.crunch_id != crunch_of(ca_cert):
        raise ConfigError(ErrorCode.CSR_IDENTITY_REFUSED, f"this CA signs for crunch {crunch_of(ca_cert)!r} only")
    public_key = _p256(public_key)
    now = pki.utc_now()
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ConfigError(ErrorCode.PKI_INVALID, f"the CA certificate expired at {ca_cert.not_valid_after_utc}")
    return (
        x509.CertificateBuilder()
        .subject_name(certs.subject_of(identity))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - pki.CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(certs.sans_of(identity), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(ROLE_EKU[identity.role])), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(ca_key, pki.signature_hash(ca_key))
    )


def sign_request(
    ca_cert: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes, csr: x509.CertificateSigningRequest,
    approval: Approval,
) -> x509.Certificate:
    """CA-1..CA-6: sign `csr` for the approved identity, or refuse with a typed error before signing."""
    return issue_for_key(ca_cert, ca_key, check_request(csr, approval), approval.identity, approval.days)


def renew_certificate(
    ca_cert: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes, old: x509.Certificate, days: int,
    csr: x509.CertificateSigningRequest | None = None,
) -> x509.Certificate:
    """Re-issue `old` (which this CA must have signed) for the same identity: same key, or the key of `csr`.

    The identity was approved when `old` was issued; a new key still goes through the full
    CSR policy for that identity.
    """
    try:
        old.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(ErrorCode.CERT_NOT_ISSUED_FOR_US, "this CA did not issue the certificate to renew") from None
    approval = Approval(certs.identity_of(old), days)
    if csr is not None:
        return sign_request(ca_cert, ca_key, csr, approval)
    _check_validity(days)
    return issue_for_key(ca_cert, ca_key, _p256(old.public_key()), approval.identity, days)


# --------------------------------------------------------------------------- the operator's folder


@dataclass(frozen=True)
class CaFolder:
    """The crunch operator's CA folder: `ca.crt` (public), `ca.key` (0600, never leaves it), `issued.jsonl`."""

    root: Path

    @property
    def cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def key(self) -> Path:
        return self.root / "ca.key"

    @property
    def log(self) -> Path:
        return self.root / ISSUED_LOG

    def create(self, crunch_id: str, days: int) -> x509.Certificate:
        if self.key.exists() or self.cert.exists():
            raise ConfigError(ErrorCode.PKI_INVALID, f"{self.root} already holds a CA; a CA is created once")
        cert, key = create_ca(crunch_id, days=days)
        pki.write_private_key(self.key, key)
        pki.write_certificate(self.cert, cert)
        return cert

    def _load(self) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
        return pki.load_certificate(self.cert), pki.load_private_key(self.key)

    def sign(self, csr_pem: bytes, role: Role, ident: str, days: int) -> x509.Certificate:
        ca_cert, ca_key = self._load()
        approval = Approval(PeerIdentity.make(crunch_of(ca_cert), role, ident), days)
        return self._logged(sign_request(ca_cert, ca_key, certs.load_csr(csr_pem), approval), "sign")

    def renew(self, old: x509.Certificate, days: int, csr_pem: bytes | None = None) -> x509.Certificate:
        ca_cert, ca_key = self._load()
        csr = certs.load_csr(csr_pem) if csr_pem is not None else None
        return self._logged(renew_certificate(ca_cert, ca_key, old, days, csr), "renew")

    def _logged(self, cert: x509.Certificate, how: str) -> x509.Certificate:
        entry = {
            "serial": format(cert.serial_number, "x"),
            "how": how,
            "spiffe_id": certs.uri_sans(cert)[0],
            "spki_sha256": certs.spki_sha256_b64url(cert.public_key()),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "issued_at": pki.utc_now().isoformat(),
        }
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
        pki.note_written(self.log, f"issuance log, one line appended ({how} serial {entry['serial']})")
        return cert

    def issued(self) -> list[dict]:
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- CLI: secure-runner pki ca ...


def add_commands(group: argparse._SubParsersAction) -> None:
    parser = group.add_parser("ca", help="crunch operator: create the CA, sign CSRs under its policy, renew, list")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=type(parser))
    init = verbs.add_parser("init", help="create the crunch CA in DIR (ca.crt public, ca.key stays here)")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--crunch", required=True, metavar="ID")
    init.add_argument("--days", type=int, default=30, metavar="N", help="CA validity (default 30)")
    init.set_defaults(func=_init)
    sign = verbs.add_parser(
        "sign", help="sign a CSR for the identity you approve (--role, --id); its own SANs are only checked"
    )
    sign.add_argument("--dir", type=Path, required=True)
    sign.add_argument("--csr", type=Path, required=True)
    sign.add_argument("--role", required=True, choices=[str(r) for r in Role])
    sign.add_argument("--id", required=True, dest="ident", metavar="ID", help="runner/node id, or the key id")
    sign.add_argument("--days", type=int, default=7, metavar="N", help=f"validity, 1..{MAX_LEAF_DAYS} (default 7)")
    sign.add_argument("--out", type=Path, required=True, help="where to write the certificate")
    sign.set_defaults(func=_sign)
    renew = verbs.add_parser("renew", help="re-issue a certificate this CA issued (same key, or --csr for a new one)")
    renew.add_argument("--dir", type=Path, required=True)
    renew.add_argument("--cert", type=Path, required=True, help="the certificate to renew")
    renew.add_argument("--csr", type=Path, help="a CSR for a new key (same identity)")
    renew.add_argument("--days", type=int, default=7, metavar="N")
    renew.add_argument("--out", type=Path, required=True)
    renew.set_defaults(func=_renew)
    listing = verbs.add_parser("list", help="print what this CA issued (issued.jsonl)")
    listing.add_argument("--dir", type=Path, required=True)
    listing.set_defaults(func=_list)


def _init(args: argparse.Namespace) -> int:
    folder = CaFolder(args.dir)
    cert = folder.create(args.crunch, args.days)
    print(f"created the CA of crunch {args.crunch!r}: {folder.cert} (give it to every party); key {folder.key}")
    print(f"  valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    return 0


def _report(cert: x509.Certificate, out: Path) -> int:
    pki.write_certificate(out, cert)
    print(f"issued {certs.uri_sans(cert)[0]} serial {cert.serial_number:x} until "
          f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC -> {out}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    csr = pki.read_file(args.csr, "CSR")
    return _report(CaFolder(args.dir).sign(csr, Role(args.role), args.ident, args.days), args.out)


def _renew(args: argparse.Namespace) -> int:
    csr = pki.read_file(args.csr, "CSR") if args.csr else None
    return _report(CaFolder(args.dir).renew(pki.load_certificate(args.cert), args.days, csr), args.out)


def _list(args: argparse.Namespace) -> int:
    for entry in CaFolder(args.dir).issued():
        print(f"{entry['issued_at']}  {entry['how']:5}  {entry['serial']}  {entry['spiffe_id']}  "
              f"key {entry['spki_sha256']}  until {entry['not_after']}")
    return 0
