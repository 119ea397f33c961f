"""Certificates and keys: a small private PKI per crunch, and the files it lives in.

Every TLS peer (coordinator, orchestrator, runner) holds a leaf certificate issued
by the crunch's CA; coordinators additionally hold an Ed25519 *identity* key that
signs call tokens, and each cruncher holds one too. The choices, and why:

* **Short-lived leaves** (7 days by default, CA 30 days). Nothing here implements
  revocation lists or OCSP; a leaf that leaks stops working on its own soon, and
  re-issuing is one function call (`issue_certificate`, `issue_runner_certificate`).
  `not_valid_before` is backdated 5 minutes so small clock skew between hosts does
  not make a fresh certificate "not yet valid". `renew` re-issues every leaf of a
  layout, keeping each TLS key unless asked to rotate it (`secure-runner pki renew DIR
  [--new-keys]`), because runner delegations bind the key; servers using
  `transport.tls.reloading_server_credentials` pick the new files up without a restart.
* **P-256 (ECDSA) leaf keys.** grpcio's TLS stack (BoringSSL as configured by
  gRPC) fails the handshake with NO_COMMON_SIGNATURE_ALGORITHMS when the *leaf*
  key is Ed25519, because the signature algorithms gRPC offers in the handshake
  do not include Ed25519. ECDSA P-256 with SHA-256 is offered everywhere.
* **Ed25519 CA key.** The CA's key only signs certificates, it never takes part
  in a handshake's CertificateVerify, and BoringSSL verifies Ed25519 certificate
  signatures in the chain just fine, so the CA can be Ed25519 over P-256 leaves.
  The CA is `path_length=0`: it issues leaves only, never intermediate CAs.
* **Exactly one URI SAN** (`spiffe://<crunch>/<role>/<id>`) plus one DNS SAN
  (`PeerIdentity.tls_server_name`). gRPC exposes the peer's URI SAN as the
  `peer_spiffe_id` auth-context property only when the certificate has exactly
  one URI SAN; with two the property is silently absent, and authorization would
  have nothing to go on. (`context.peer_identities()` is no substitute: it lists
  every SAN, URI and DNS alike.) The DNS SAN is what clients pin with
  `grpc.ssl_target_name_override`.
* **Extended key usage serverAuth + clientAuth for every role.** Runners and
  orchestrators are servers and coordinators are clients, but an orchestrator
  also calls runners, and a single code path for all leaves is easier to audit
  than per-role variants. What a peer may *do* is decided by its SPIFFE id
  (role + id), never by its EKU.
* **Key files are PKCS#8 PEM, unencrypted, mode 0600**, written via a temporary
  file created with `os.open(..., 0o600)` then atomically renamed, so a key is
  never world-readable, not even for an instant, and a reader never sees half a
  file. Identity keys use `cryptography`'s serialization, not PyNaCl's: the file
  format stays standard (`openssl pkey` reads it); PyNaCl users convert through
  the 32-byte raw seed (`key.private_bytes_raw()`).
* A coordinator's key id is `"k" + sha256(raw public key)[:24 hex]`, a valid id
  (`validate_id`), and its TLS certificate's URI names that key id, so a token's
  key id and the connection it arrives on can be tied together.

`make_test_pki` writes a complete layout (CA, coordinator, orchestrator, one
runner per model, one identity key per cruncher, and `registry.json`) for tests,
examples and a local deployment; `main` is the `secure-runner pki` CLI.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nacl.signing import SigningKey

from secure_runner.errors import ConfigError, ErrorCode, SecureRunnerError
from secure_runner.smp.identity import PeerIdentity, Role, validate_id
from secure_runner.smp.registry import CoordinatorKey, CrunchEntry, ModelEntry, Registry

__all__ = [
    "CLOCK_SKEW",
    "ModelSpec",
    "PkiLayout",
    "generate_ca",
    "generate_identity_key",
    "issue_certificate",
    "issue_runner_certificate",
    "key_id_for",
    "load_certificate",
    "load_identity_key",
    "load_private_key",
    "main",
    "make_test_pki",
    "public_key_raw",
    "renew",
    "write_certificate",
    "write_private_key",
]

CLOCK_SKEW = timedelta(minutes=5)
"""Certificates and registry keys are valid from this long before their issue time."""

_CN_MAX = 64  # ub-common-name (RFC 5280); cryptography refuses longer.
_ORCHESTRATOR_ID = "orchestrator"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _check_days(days: int, what: str) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(ErrorCode.PKI_INVALID, f"{what} must be a whole number of days >= 1, got {days!r}")
    return days


# --------------------------------------------------------------------------- keys


def generate_identity_key() -> Ed25519PrivateKey:
    """A new Ed25519 identity (signing) key."""
    return Ed25519PrivateKey.generate()


def public_key_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (of a private key's public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    if not isinstance(public, Ed25519PublicKey):
        raise ConfigError(ErrorCode.PKI_INVALID, f"expected an Ed25519 key, got {type(key).__name__}")
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_for(public_raw: bytes) -> str:
    """The key id of a raw Ed25519 public key: "k" + first 24 hex digits of its SHA-256."""
    if len(public_raw) != 32:
        raise ConfigError(ErrorCode.PKI_INVALID, f"an Ed25519 public key is 32 bytes, got {len(public_raw)}")
    return "k" + hashlib.sha256(public_raw).hexdigest()[:24]


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` via a temp file created with `mode`, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_private_key(path: Path | str, key: CertificateIssuerPrivateKeyTypes) -> None:
    """Write `key` as unencrypted PKCS#8 PEM, mode 0600 from the moment the file exists.

    The file is created with `os.open(..., O_CREAT | O_EXCL, 0o600)` (by `mkstemp`)
    next to `path` and renamed over it, so neither an old wide-permission file nor
    a partially written key is ever visible.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        _atomic_write(Path(path), pem, 0o600)
    except OSError as exc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"cannot write private key {path}: {exc.strerror or exc}") from None


def write_certificate(path: Path | str, cert: x509.Certificate) -> None:
    """Write `cert` as PEM (mode 0644: certificates are public)."""
    try:
        _atomic_write(Path(path), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"cannot write certificate {path}: {exc.strerror or exc}") from None


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_certificate(path: Path | str) -> x509.Certificate:
    """Load the first PEM certificate in `path`."""
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(ErrorCode.PKI_INVALID, f"{path} is not a PEM X.509 certificate") from None


def load_private_key(path: Path | str) -> CertificateIssuerPrivateKeyTypes:
    """Load an unencrypted PEM private key (Ed25519 or EC) from `path`."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted, and we gave no password
        raise ConfigError(
            ErrorCode.PKI_INVALID, f"{path} is an encrypted private key; use an unencrypted one"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(ErrorCode.PKI_INVALID, f"{path} is not a PEM private key") from None
    if not isinstance(key, (Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
        raise ConfigError(
            ErrorCode.PKI_INVALID, f"{path} holds a {type(key).__name__}; expected an Ed25519 or EC key"
        )
    return key


def load_identity_key(path: Path | str) -> Ed25519PrivateKey:
    """Load an Ed25519 identity (signing) key from a PKCS#8 PEM file."""
    key = load_private_key(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(ErrorCode.PKI_INVALID, f"{path} is not an Ed25519 identity key")
    return key


def load_signing_key(path: Path | str) -> SigningKey:
    """An identity key (`load_identity_key`) as a libsodium signing key: what tokens are signed with."""
    return SigningKey(load_identity_key(path).private_bytes_raw())


# --------------------------------------------------------------------------- certificates


def generate_ca(crunch_id: str, *, days: int = 30) -> tuple[x509.Certificate, Ed25519PrivateKey]:
    """A self-signed Ed25519 CA for `crunch_id`, allowed to issue leaves only (path_length=0)."""
    validate_id(crunch_id, "crunch id")
    _check_days(days, "CA validity")
    key = Ed25519PrivateKey.generate()
    common_name = f"secure-runner CA {crunch_id}"
    if len(common_name) > _CN_MAX:  # the crunch id is always in O as well
        common_name = "secure-runner CA"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, crunch_id),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)  # Ed25519 signs without a separate hash
    )
    return cert, key


def _check_ca_pair(ca_cert: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes) -> None:
    pub = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if ca_cert.public_key().public_bytes(*pub) != ca_key.public_key().public_bytes(*pub):
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


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    identity: PeerIdentity,
    *,
    days: int = 7,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new P-256 key and a leaf certificate for `identity`, signed by the CA.

    SAN: exactly one URI (`identity.spiffe_id`) and one DNS name
    (`identity.tls_server_name`). EKU: serverAuth and clientAuth, for every role.
    Valid from 5 minutes ago for `days` days, but never past the CA's own expiry
    (the leaf is cut short rather than outliving its issuer); an expired CA is refused.
    """
    identity = PeerIdentity.make(identity.crunch_id, identity.role, identity.ident)
    _check_days(days, "certificate validity")
    _check_ca_pair(ca_cert, ca_key)
    now = _now()
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ConfigError(ErrorCode.PKI_INVALID, f"the CA certificate expired at {ca_cert.not_valid_after_utc}")

    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    elif not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(ErrorCode.PKI_INVALID, "leaf keys must be P-256")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.crunch_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(identity.role)),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.ident),
        ]
    )
    hash_alg = None if isinstance(ca_key, Ed25519PrivateKey) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(identity.spiffe_id),
                    x509.DNSName(identity.tls_server_name),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hash_alg)
    )
    return cert, key


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ModelSpec:
    """One model to provision: its id and name, and the cruncher who owns it.

    `cruncher_id` may be empty (no cruncher identity key is made and the
    registry entry has no `identity_public_key`); `cruncher_name` then must be empty too.
    """

    model_id: str
    model_name: str = ""
    cruncher_id: str = ""
    cruncher_name: str = ""


@dataclass(frozen=True)
class PkiLayout:
    """Where every file of a PKI made by `make_test_pki` lives, under `root`."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def coordinator_dir(self) -> Path:
        return self.root / "coordinator"

    @property
    def coordinator_cert(self) -> Path:
        return self.coordinator_dir / "tls.crt"

    @property
    def coordinator_key(self) -> Path:
        return self.coordinator_dir / "tls.key"

    @property
    def coordinator_identity(self) -> Path:
        return self.coordinator_dir / "identity.key"

    @property
    def orchestrator_dir(self) -> Path:
        return self.root / "orchestrator"

    @property
    def orchestrator_cert(self) -> Path:
        return self.orchestrator_dir / "tls.crt"

    @property
    def orchestrator_key(self) -> Path:
        return self.orchestrator_dir / "tls.key"

    @property
    def runners_dir(self) -> Path:
        return self.root / "runners"

    def runner_dir(self, model_id: str) -> Path:
        return self.runners_dir / validate_id(model_id, "model id")  # also keeps paths inside root

    def runner_cert(self, model_id: str) -> Path:
        return self.runner_dir(model_id) / "tls.crt"

    def runner_key(self, model_id: str) -> Path:
        return self.runner_dir(model_id) / "tls.key"

    @property
    def crunchers_dir(self) -> Path:
        return self.root / "crunchers"

    def cruncher_identity(self, cruncher_id: str) -> Path:
        return self.crunchers_dir / validate_id(cruncher_id, "cruncher id") / "identity.key"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _validate_models(models: Sequence[ModelSpec]) -> dict[str, str]:
    """Check ids and consistency; return cruncher id -> cruncher name."""
    seen: set[str] = set()
    crunchers: dict[str, str] = {}
    for spec in models:
        validate_id(spec.model_id, "model id")
        if spec.model_id in seen:
            raise ConfigError(ErrorCode.PKI_INVALID, f"model id {spec.model_id!r} is given twice")
        seen.add(spec.model_id)
        if not spec.cruncher_id:
            if spec.cruncher_name:
                raise ConfigError(
                    ErrorCode.PKI_INVALID, f"model {spec.model_id!r} has a cruncher name but no cruncher id"
                )
            continue
        validate_id(spec.cruncher_id, "cruncher id")
        known = crunchers.setdefault(spec.cruncher_id, spec.cruncher_name)
        if known != spec.cruncher_name:
            raise ConfigError(
                ErrorCode.PKI_INVALID,
                f"cruncher {spec.cruncher_id!r} is named both {known!r} and {spec.cruncher_name!r}",
            )
    return crunchers


def _clear_layout(layout: PkiLayout) -> None:
    """Remove the files a previous `make_test_pki` wrote (and nothing else), for `force=True`."""
    files = [
        layout.ca_cert, layout.ca_key, layout.registry,
        layout.coordinator_cert, layout.coordinator_key, layout.coordinator_identity,
        layout.orchestrator_cert, layout.orchestrator_key,
    ]  # fmt: skip
    dirs = [layout.coordinator_dir, layout.orchestrator_dir]
    for parent, names in ((layout.runners_dir, ("tls.crt", "tls.key")), (layout.crunchers_dir, ("identity.key",))):
        if parent.is_dir():
            for sub in parent.iterdir():
                if sub.is_dir() and not sub.is_symlink():
                    files.extend(sub / name for name in names)
                    dirs.append(sub)
        dirs.append(parent)
    for path in files:
        if path.is_file() or path.is_symlink():
            path.unlink()
    for directory in dirs:
        try:
            directory.rmdir()  # only if now empty
        except OSError:
            pass


def make_test_pki(
    out_dir: Path | str,
    crunch_id: str,
    models: Sequence[ModelSpec],
    *,
    days: int = 7,
    ca_days: int = 30,
    force: bool = False,
) -> PkiLayout:
    """Write a complete PKI for one crunch under `out_dir` and return its layout.

    Writes the CA, the coordinator (TLS cert whose id is its signing key's key id,
    plus that Ed25519 identity key), the orchestrator, one runner cert per model,
    one identity key per distinct cruncher, and `registry.json`. Everything is
    validated before the first file is written. An existing non-empty `out_dir` is
    refused unless `force`, which replaces only the files of a previous layout.
    """
    validate_id(crunch_id, "crunch id")
    _check_days(days, "certificate validity")
    _check_days(ca_days, "CA validity")
    if days > ca_days:
        raise ConfigError(ErrorCode.PKI_INVALID, f"leaf validity ({days} days) exceeds the CA's ({ca_days} days)")
    models = list(models)
    crunchers = _validate_models(models)

    layout = PkiLayout(Path(out_dir))
    root = layout.root
    if root.exists() and not root.is_dir():
        raise ConfigError(ErrorCode.PKI_INVALID, f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not force:
            raise ConfigError(ErrorCode.PKI_INVALID, f"{root} is not empty; pass force=True (--force) to overwrite")
        _clear_layout(layout)
    root.mkdir(parents=True, exist_ok=True)

    now = _now()
    ca_cert, ca_key = generate_ca(crunch_id, days=ca_days)
    write_certificate(layout.ca_cert, ca_cert)
    write_private_key(layout.ca_key, ca_key)

    coordinator_identity = generate_identity_key()
    coordinator_pub = public_key_raw(coordinator_identity)
    coordinator_key_id = key_id_for(coordinator_pub)
    write_private_key(layout.coordinator_identity, coordinator_identity)

    def issue(identity: PeerIdentity, cert_path: Path, key_path: Path) -> None:
        cert, key = issue_certificate(ca_cert, ca_key, identity, days=days)
        write_private_key(key_path, key)
        write_certificate(cert_path, cert)

    issue(
        PeerIdentity.make(crunch_id, Role.COORDINATOR, coordinator_key_id),
        layout.coordinator_cert,
        layout.coordinator_key,
    )
    issue(
        PeerIdentity.make(crunch_id, Role.ORCHESTRATOR, _ORCHESTRATOR_ID),
        layout.orchestrator_cert,
        layout.orchestrator_key,
    )
    for spec in models:
        issue(
            PeerIdentity.make(crunch_id, Role.RUNNER, spec.model_id),
            layout.runner_cert(spec.model_id),
            layout.runner_key(spec.model_id),
        )

    cruncher_pubs: dict[str, str] = {}
    for cruncher_id in crunchers:
        key = generate_identity_key()
        write_private_key(layout.cruncher_identity(cruncher_id), key)
        cruncher_pubs[cruncher_id] = _b64(public_key_raw(key))

    registry = Registry(
        version=1,
        crunches={
            crunch_id: CrunchEntry(
                coordinators=[
                    CoordinatorKey(
                        key_id=coordinator_key_id,
                        public_key=_b64(coordinator_pub),
                        not_before=now - CLOCK_SKEW,
                        not_after=now + timedelta(days=ca_days),
                    )
                ],
                models=[
                    ModelEntry(
                        model_id=spec.model_id,
                        model_name=spec.model_name,
                        cruncher_id=spec.cruncher_id,
                        cruncher_name=spec.cruncher_name,
                        identity_public_key=cruncher_pubs.get(spec.cruncher_id),
                    )
                    for spec in models
                ],
            )
        },
    )
    try:
        _atomic_write(layout.registry, (registry.to_json() + "\n").encode(), 0o644)
    except OSError as exc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"cannot write {layout.registry}: {exc.strerror or exc}") from None
    return layout


def _layout_crunch_id(ca_cert: x509.Certificate) -> str:
    orgs = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(orgs) != 1 or not isinstance(orgs[0].value, str):
        raise ConfigError(
            ErrorCode.PKI_INVALID, "the CA certificate does not name its crunch (subject O); pass crunch_id"
        )
    return validate_id(orgs[0].value, "crunch id")


def issue_runner_certificate(
    layout: PkiLayout, model_id: str, days: int = 7, *, crunch_id: str | None = None
) -> x509.Certificate:
    """(Re)issue the runner certificate and key for `model_id` into `runners/<model_id>/`.

    Signs with the layout's CA (`ca.crt`, `ca.key`). The crunch id defaults to the
    one the CA certificate names (its subject O, as `generate_ca` writes it).
    The key is written before the certificate, each atomically.
    """
    ca_cert = load_certificate(layout.ca_cert)
    ca_key = load_private_key(layout.ca_key)
    crunch = _layout_crunch_id(ca_cert) if crunch_id is None else crunch_id
    identity = PeerIdentity.make(crunch, Role.RUNNER, model_id)
    cert, key = issue_certificate(ca_cert, ca_key, identity, days=days)
    write_private_key(layout.runner_key(model_id), key)
    write_certificate(layout.runner_cert(model_id), cert)
    return cert


def _layout_leaves(layout: PkiLayout, crunch_id: str) -> list[tuple[PeerIdentity, Path, Path]]:
    """(identity, certificate path, key path) of every leaf certificate the layout holds."""
    leaves: list[tuple[PeerIdentity, Path, Path]] = []
    if layout.coordinator_cert.is_file():
        key_id = key_id_for(public_key_raw(load_identity_key(layout.coordinator_identity)))
        coordinator = PeerIdentity.make(crunch_id, Role.COORDINATOR, key_id)
        leaves.append((coordinator, layout.coordinator_cert, layout.coordinator_key))
    if layout.orchestrator_cert.is_file():
        orchestrator = PeerIdentity.make(crunch_id, Role.ORCHESTRATOR, _ORCHESTRATOR_ID)
        leaves.append((orchestrator, layout.orchestrator_cert, layout.orchestrator_key))
    if layout.runners_dir.is_dir():
        for sub in sorted(layout.runners_dir.iterdir()):
            if sub.is_dir() and not sub.is_symlink() and (sub / "tls.crt").is_file():
                runner = PeerIdentity.make(crunch_id, Role.RUNNER, sub.name)
                leaves.append((runner, layout.runner_cert(sub.name), layout.runner_key(sub.name)))
    return leaves


def renew(layout: PkiLayout, *, days: int = 7, new_keys: bool = False) -> list[Path]:
    """Re-issue every leaf certificate of `layout`; return the certificate paths.

    By default each leaf keeps its TLS key: a runner's identity delegation binds
    that key (SMP-35), so renewing the certificate alone leaves delegations
    valid. `new_keys=True` rotates the keys too; runners then need delegations
    for their new keys before clients accept them.

    Covers the coordinator, the orchestrator and every runner under `runners/`
    that has a certificate. Each keeps its identity (SPIFFE id and DNS name; the
    coordinator's still names its signing key id) and is signed by the layout's
    existing CA; the CA, the identity keys and `registry.json` are not touched.
    Everything is checked and issued in memory before the first file is written;
    then, per leaf, the key and then the certificate are each replaced atomically
    (a reloading server keeps its old pair until the matching new one is complete).
    """
    _check_days(days, "certificate validity")
    ca_cert = load_certificate(layout.ca_cert)
    ca_key = load_private_key(layout.ca_key)
    leaves = _layout_leaves(layout, _layout_crunch_id(ca_cert))
    if not leaves:
        raise ConfigError(ErrorCode.PKI_INVALID, f"no leaf certificates to renew in {layout.root}")
    issued = [
        (issue_certificate(ca_cert, ca_key, identity, days=days, key=None if new_keys else _reusable_key(key_path)),
         cert_path, key_path)
        for identity, cert_path, key_path in leaves
    ]  # fmt: skip
    for (cert, key), cert_path, key_path in issued:
        write_private_key(key_path, key)
        write_certificate(cert_path, cert)
    return [cert_path for _, cert_path, _ in issued]


def _reusable_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    """The existing P-256 key at `path`, or None (a new one is made) if it is missing or unusable."""
    try:
        key = load_private_key(path)
    except ConfigError:
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1) else None


# --------------------------------------------------------------------------- CLI


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _parse_model(value: str) -> ModelSpec:
    parts = value.split(":", 3)
    parts += [""] * (4 - len(parts))
    return ModelSpec(model_id=parts[0], model_name=parts[1], cruncher_id=parts[2], cruncher_name=parts[3])


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secure-runner pki", description="Create certificates and keys for secure-runner.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    init = commands.add_parser(
        "init",
        help="write a CA, coordinator, orchestrator and runner certificates, identity keys and registry.json",
        description="Write a complete PKI for one crunch into OUT (see secure_runner.pki.make_test_pki).",
    )
    init.add_argument("out", metavar="OUT", type=Path, help="directory to write (must be empty unless --force)")
    init.add_argument("--crunch", required=True, metavar="ID", help="crunch id")
    init.add_argument(
        "--model",
        action="append",
        default=[],
        type=_parse_model,
        metavar="ID[:NAME[:CRUNCHER_ID[:CRUNCHER_NAME]]]",
        help="a model to issue a runner certificate for (repeatable)",
    )
    init.add_argument("--days", type=int, default=7, metavar="N", help="leaf certificate validity (default 7)")
    init.add_argument(
        "--ca-days", type=int, default=30, metavar="N", help="CA and coordinator key validity (default 30)"
    )
    init.add_argument("--force", action="store_true", help="replace the files of an existing layout in OUT")
    renew_cmd = commands.add_parser(
        "renew",
        help="re-issue every leaf certificate of a layout from its CA",
        description="Re-issue the coordinator, orchestrator and runner certificates in DIR "
        "(see secure_runner.pki.renew); the CA, identity keys and registry are kept, and so are "
        "the TLS keys unless --new-keys is given.",
    )
    renew_cmd.add_argument("--new-keys", action="store_true", help="rotate the TLS keys too")
    renew_cmd.add_argument("dir", metavar="DIR", type=Path, help="a directory written by `pki init`")
    renew_cmd.add_argument("--days", type=int, default=7, metavar="N", help="leaf certificate validity (default 7)")
    return parser


def _init(args: argparse.Namespace) -> int:
    layout = make_test_pki(args.out, args.crunch, args.model, days=args.days, ca_days=args.ca_days, force=args.force)
    key_id = key_id_for(public_key_raw(load_identity_key(layout.coordinator_identity)))
    lines = [
        f"wrote PKI for crunch {args.crunch!r} in {layout.root}",
        f"  CA:              {layout.ca_cert}  (key {layout.ca_key})",
        f"  coordinator:     {layout.coordinator_cert}  (key {layout.coordinator_key})",
        f"  coordinator key: {layout.coordinator_identity}  (key id {key_id})",
        f"  orchestrator:    {layout.orchestrator_cert}  (key {layout.orchestrator_key})",
    ]
    for spec in args.model:
        cert, key = layout.runner_cert(spec.model_id), layout.runner_key(spec.model_id)
        lines.append(f"  runner {spec.model_id}: {cert}  (key {key})")
    for cruncher_id in dict.fromkeys(spec.cruncher_id for spec in args.model if spec.cruncher_id):
        lines.append(f"  cruncher {cruncher_id}: {layout.cruncher_identity(cruncher_id)}")
    lines.append(f"  registry:        {layout.registry}")
    print("\n".join(lines))
    return 0


def _renew(args: argparse.Namespace) -> int:
    paths = renew(PkiLayout(args.dir), days=args.days, new_keys=args.new_keys)
    lines = [f"renewed {len(paths)} certificates in {args.dir}"]
    for path in paths:
        lines.append(f"  {path}  (valid until {load_certificate(path).not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC)")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`secure-runner pki ...`: 0 on success, 2 with one line on stderr on any error."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        return _renew(args) if args.command == "renew" else _init(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except _UsageError as exc:
        message = str(exc)
    except SecureRunnerError as exc:
        message = f"{exc.code}: {exc.message}"
    except OSError as exc:
        message = f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    print(f"secure-runner pki: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
