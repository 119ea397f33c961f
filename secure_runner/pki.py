"""Certificates and keys: a small private PKI per crunch, and the files it lives in.

Every TLS peer (coordinator, operator, orchestrator, runner) holds a leaf certificate
issued by the crunch's CA; coordinators and operators additionally hold an Ed25519
*identity* key that signs call tokens, and each cruncher holds one too. The choices, and why:

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
* **P-256 CA key** (ECDSA with SHA-256). Standard path validation
  (`cryptography.x509.verification`, the CA/Browser Forum profile) refuses Ed25519
  signatures, and every certificate a party installs is path-validated
  (provisioning/certs.py: `verify_leaf`). The CA is `path_length=0`: it issues leaves
  only, never intermediate CAs. (CAs made by older versions were Ed25519; they still
  sign, see `signature_hash`, but their leaves do not pass `verify_leaf`.)
* **Exactly one URI SAN** (`spiffe://<crunch>/<role>/<id>`) plus one DNS SAN
  (`PeerIdentity.tls_server_name`). gRPC exposes the peer's URI SAN as the
  `peer_spiffe_id` auth-context property only when the certificate has exactly
  one URI SAN; with two the property is silently absent, and authorization would
  have nothing to go on. (`context.peer_identities()` is no substitute: it lists
  every SAN, URI and DNS alike.) The DNS SAN is what clients pin with
  `grpc.ssl_target_name_override`. The CA sets both from the operator's approval,
  never from the CSR (provisioning/ca.py).
* **Extended key usage per role** (provisioning/ca.py: `ROLE_EKU`): coordinators and
  operators clientAuth only; orchestrators and runners serverAuth and clientAuth.
  What a peer may *do* is still decided by its SPIFFE id (role + id), never by its EKU.
* **Key files are PKCS#8 PEM, unencrypted, mode 0600**, written via a temporary
  file created with `os.open(..., 0o600)` then atomically renamed, so a key is
  never world-readable, not even for an instant, and a reader never sees half a
  file. Identity keys use `cryptography`'s serialization, not PyNaCl's: the file
  format stays standard (`openssl pkey` reads it); PyNaCl users convert through
  the 32-byte raw seed (`key.private_bytes_raw()`).
* A coordinator's key id is `"k" + sha256(raw public key)[:24 hex]`, a valid id
  (`validate_id`), and its TLS certificate's URI names that key id, so a token's
  key id and the connection it arrives on can be tied together.

`make_test_pki` writes a complete layout (CA, coordinator, operator, orchestrator, one
runner per model, one identity key per cruncher, and `registry.json`) for tests and the
demo by running every party's provisioning steps (secure_runner/provisioning/) in one
folder; `main` is the `secure-runner pki` CLI: `init` and `renew` for that test PKI, and
one command group per party (`ca`, `coordinator`, `operator`, `cruncher`, `runner-host`,
`registry`) for a deployment where each party keeps its own keys.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from nacl.signing import SigningKey

from secure_runner.errors import ConfigError, ErrorCode, SecureRunnerError
from secure_runner.smp.identity import PeerIdentity, Role, validate_id
from secure_runner.smp.registry import Registry, key_id_for

__all__ = [
    "CLOCK_SKEW",
    "ORCHESTRATOR_ID",
    "ModelSpec",
    "PkiLayout",
    "b64",
    "check_days",
    "generate_ca",
    "generate_identity_key",
    "issue_certificate",
    "issue_runner_certificate",
    "key_id_for",
    "load_certificate",
    "load_identity_key",
    "load_private_key",
    "load_signing_key",
    "main",
    "make_test_pki",
    "public_key_raw",
    "read_file",
    "renew",
    "signature_hash",
    "utc_now",
    "validate_models",
    "write_certificate",
    "write_private_key",
    "write_public_file",
    "write_registry",
]

CLOCK_SKEW = timedelta(minutes=5)
"""Certificates and registry keys are valid from this long before their issue time."""

ORCHESTRATOR_ID = "orchestrator"  # the one orchestrator of a crunch: its certificate's id


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def check_days(days: int, what: str) -> int:
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


# --------------------------------------------------------------------------- files

_WRITTEN: ContextVar[Callable[[str], None] | None] = ContextVar("pki_written", default=None)


@contextlib.contextmanager
def reporting_writes(report: Callable[[str], None]) -> Iterator[None]:
    """Inside the block, each file written here is reported to `report` as one line.

    `wrote <path>: <kind>`, and for a certificate its subject, SPIFFE id and expiry.
    The `secure-runner pki` commands print these on stderr (stdout stays for what a
    command prints to be piped: public material, listings); library callers, such as
    the orchestrator issuing runner certificates, stay silent.
    """
    token = _WRITTEN.set(report)
    try:
        yield
    finally:
        _WRITTEN.reset(token)


def note_written(path: Path | str, kind: str) -> None:
    """Report one written file (see `reporting_writes`); nothing outside such a block."""
    if (report := _WRITTEN.get()) is not None:
        report(f"wrote {path}: {kind}")


def _certificate_kind(cert: x509.Certificate) -> str:
    extensions = {type(ext.value): ext.value for ext in cert.extensions}
    is_ca = getattr(extensions.get(x509.BasicConstraints), "ca", False)
    sans = extensions.get(x509.SubjectAlternativeName)
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier) if sans is not None else []
    name = f", {uris[0]}" if uris else ""
    return (f"{'CA ' if is_ca else ''}certificate, subject {cert.subject.rfc4514_string()}{name}, "
            f"expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")


CURVE_NAMES = {"secp256r1": "P-256"}  # as the README and the design name them


def _key_kind(key: CertificateIssuerPrivateKeyTypes) -> str:
    curve = getattr(key, "curve", None)
    algorithm = "Ed25519" if isinstance(key, Ed25519PrivateKey) else f"ECDSA {CURVE_NAMES.get(curve.name, curve.name)}"
    return f"{algorithm} private key, mode 0600"


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
    note_written(path, _key_kind(key))


def write_certificate(path: Path | str, cert: x509.Certificate) -> None:
    """Write `cert` as PEM (mode 0644: certificates are public)."""
    try:
        _atomic_write(Path(path), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"cannot write certificate {path}: {exc.strerror or exc}") from None
    note_written(path, _certificate_kind(cert))


def write_public_file(path: Path | str, data: bytes, kind: str = "public file") -> None:
    """Write public material (a CSR, a delegation, a public-key file) atomically, mode 0644."""
    try:
        _atomic_write(Path(path), data, 0o644)
    except OSError as exc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"cannot write {path}: {exc.strerror or exc}") from None
    note_written(path, kind)


def write_registry(path: Path | str, data: bytes | Registry) -> None:
    """Write a registry file after parsing it (a file that would not load is refused here, not at the reader)."""
    registry = data if isinstance(data, Registry) else Registry.from_json(data)
    write_public_file(path, (registry.to_json() + "\n").encode(), "registry")


def read_file(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_certificate(path: Path | str) -> x509.Certificate:
    """Load the first PEM certificate in `path`."""
    data = read_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(ErrorCode.PKI_INVALID, f"{path} is not a PEM X.509 certificate") from None


def load_private_key(path: Path | str) -> CertificateIssuerPrivateKeyTypes:
    """Load an unencrypted PEM private key (Ed25519 or EC) from `path`."""
    data = read_file(path, "private key")
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


def generate_ca(crunch_id: str, *, days: int = 30) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new crunch CA (provisioning/ca.py: `create_ca`)."""
    from secure_runner.provisioning import ca

    return ca.create_ca(crunch_id, days=days)


def signature_hash(ca_key: CertificateIssuerPrivateKeyTypes) -> hashes.HashAlgorithm | None:
    """The hash `Certificate.sign` needs for `ca_key`: none for Ed25519 (older CAs), SHA-256 otherwise."""
    return None if isinstance(ca_key, Ed25519PrivateKey) else hashes.SHA256()


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    identity: PeerIdentity,
    *,
    days: int = 7,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Both sides of one issuance on one machine (the test PKI): the party's key and CSR, the CA's signature.

    The party's step makes (or takes) the P-256 `key` and a CSR asking for `identity`;
    the CA's step signs that CSR under its policy with `identity` as the approval
    (provisioning/ca.py), seeing only the public key. Valid from 5 minutes ago for
    `days` days, never past the CA's own expiry; an expired CA is refused.
    """
    from secure_runner.provisioning import ca, certs

    check_days(days, "certificate validity")
    if key is None:
        key = certs.generate_tls_key()
    elif not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(ErrorCode.PKI_INVALID, "leaf keys must be P-256")
    identity = PeerIdentity.make(identity.crunch_id, identity.role, identity.ident)
    return ca.sign_request(ca_cert, ca_key, certs.make_csr(key, identity), ca.Approval(identity, days)), key


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
    def operator_dir(self) -> Path:
        return self.root / "operator"

    @property
    def operator_cert(self) -> Path:
        return self.operator_dir / "tls.crt"

    @property
    def operator_key(self) -> Path:
        return self.operator_dir / "tls.key"

    @property
    def operator_identity(self) -> Path:
        return self.operator_dir / "identity.key"

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


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def validate_models(models: Sequence[ModelSpec]) -> dict[str, str]:
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
        layout.ca_cert, layout.ca_key, layout.root / "issued.jsonl", layout.registry,
        layout.coordinator_cert, layout.coordinator_key, layout.coordinator_dir / "tls.csr", layout.coordinator_identity,
        layout.operator_cert, layout.operator_key, layout.operator_dir / "tls.csr", layout.operator_identity,
        layout.orchestrator_cert, layout.orchestrator_key, layout.orchestrator_dir / "tls.csr",
    ]  # fmt: skip
    dirs = [layout.coordinator_dir, layout.operator_dir, layout.orchestrator_dir]
    for parent, names in ((layout.runners_dir, ("tls.crt", "tls.key", "tls.csr")), (layout.crunchers_dir, ("identity.key",))):
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
    """Every party's provisioning steps, run in one folder: the demo's and the tests' one-shot PKI.

    The same steps each party runs on its own machine (secure_runner/provisioning/): the
    operator creates the CA; the coordinator and the operator each make a signing key, a
    TLS key and a CSR, which the CA signs for the approved identity and they install; the
    runner host does the same for the orchestrator and one runner per model; each cruncher
    makes its identity key; the registry is built from the public material. What differs
    from a deployment is only that every secret ends up in this one folder, which is why it
    is a test PKI. Arguments are validated before the first file is written. An existing
    non-empty `out_dir` is refused unless `force`, which replaces only the files of a
    previous layout.
    """
    from secure_runner.provisioning import ca, coordinator, cruncher, public, registry_builder, runner_host

    validate_id(crunch_id, "crunch id")
    check_days(days, "certificate validity")
    check_days(ca_days, "CA validity")
    if days > ca_days:
        raise ConfigError(ErrorCode.PKI_INVALID, f"leaf validity ({days} days) exceeds the CA's ({ca_days} days)")
    if days > ca.MAX_LEAF_DAYS:
        raise ConfigError(ErrorCode.CSR_VALIDITY_REFUSED, f"leaf validity is at most {ca.MAX_LEAF_DAYS} days")
    models = list(models)
    crunchers = validate_models(models)

    layout = PkiLayout(Path(out_dir))
    root = layout.root
    if root.exists() and not root.is_dir():
        raise ConfigError(ErrorCode.PKI_INVALID, f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not force:
            raise ConfigError(ErrorCode.PKI_INVALID, f"{root} is not empty; pass force=True (--force) to overwrite")
        _clear_layout(layout)
    root.mkdir(parents=True, exist_ok=True)

    authority = ca.CaFolder(root)
    ca_cert = authority.create(crunch_id, ca_days)
    signers = []
    for role in coordinator.SIGNER_ROLES:
        home = coordinator.SignerHome(root, role)
        material = home.init(crunch_id)
        cert = authority.sign(home.current.tls_csr.read_bytes(), role, material.keys[0].key_id, days)
        home.install(cert, ca_cert)
        signers.append(material)
    host = runner_host.HostHome(root)
    runner_ids = [PeerIdentity.make(crunch_id, Role.RUNNER, spec.model_id) for spec in models]
    for identity in [PeerIdentity.make(crunch_id, Role.ORCHESTRATOR, ORCHESTRATOR_ID), *runner_ids]:
        csr = host.request(identity).read_bytes()
        host.install(authority.sign(csr, identity.role, identity.ident, days), ca_cert)
    cruncher_material: list[public.CruncherPublic] = []
    for cruncher_id in crunchers:
        key = cruncher.create_identity(layout.cruncher_identity(cruncher_id).parent)
        cruncher_material.append(cruncher.public_material(cruncher_id, key))
    registry = registry_builder.build(
        crunch_id, signers=signers, crunchers=cruncher_material, models=models, days=ca_days
    )
    write_registry(layout.registry, registry)
    return layout


def issue_runner_certificate(
    layout: PkiLayout, model_id: str, days: int = 7, *, crunch_id: str | None = None
) -> x509.Certificate:
    """(Re)issue the runner certificate and a new key for `model_id` into `runners/<model_id>/` (test PKI).

    Runner host and CA on one machine: a new key and CSR, signed by the layout's CA
    (`ca.crt`, `ca.key`) for the runner's identity. The crunch id defaults to the CA's.
    The key is written before the certificate, each atomically.
    """
    from secure_runner.provisioning import ca

    ca_cert = load_certificate(layout.ca_cert)
    ca_key = load_private_key(layout.ca_key)
    crunch = ca.crunch_of(ca_cert) if crunch_id is None else crunch_id
    cert, key = issue_certificate(ca_cert, ca_key, PeerIdentity.make(crunch, Role.RUNNER, model_id), days=days)
    write_private_key(layout.runner_key(model_id), key)
    write_certificate(layout.runner_cert(model_id), cert)
    return cert


def _layout_leaves(layout: PkiLayout) -> list[tuple[Path, Path]]:
    """(certificate path, key path) of every leaf certificate the layout holds."""
    leaves = [(layout.coordinator_cert, layout.coordinator_key), (layout.operator_cert, layout.operator_key),
              (layout.orchestrator_cert, layout.orchestrator_key)]
    if layout.runners_dir.is_dir():
        for sub in sorted(layout.runners_dir.iterdir()):
            if sub.is_dir() and not sub.is_symlink():
                leaves.append((sub / "tls.crt", sub / "tls.key"))
    return [(cert, key) for cert, key in leaves if cert.is_file()]


def renew(layout: PkiLayout, *, days: int = 7, new_keys: bool = False) -> list[Path]:
    """Re-issue every leaf certificate of `layout`; return the certificate paths.

    The CA renews from each certificate it issued: the same identity (its SPIFFE id and
    DNS name), and by default the same public key, read from the certificate (no leaf
    private key is loaded): a runner's identity delegation binds that key (SMP-35), so
    renewing the certificate alone leaves delegations valid. `new_keys=True` has each
    leaf make a new key and CSR first; runners then need delegations for their new keys
    before clients accept them. The CA, the identity keys and `registry.json` are not
    touched. Everything is checked and issued in memory before the first file is written;
    then, per leaf, the key and then the certificate are each replaced atomically (a
    reloading server keeps its old pair until the matching new one is complete).
    """
    from secure_runner.provisioning import ca, certs

    check_days(days, "certificate validity")
    ca_cert = load_certificate(layout.ca_cert)
    ca_key = load_private_key(layout.ca_key)
    leaves = _layout_leaves(layout)
    if not leaves:
        raise ConfigError(ErrorCode.PKI_INVALID, f"no leaf certificates to renew in {layout.root}")
    issued = []
    for cert_path, key_path in leaves:
        old = load_certificate(cert_path)
        key = certs.generate_tls_key() if new_keys else None
        csr = certs.make_csr(key, certs.identity_of(old)) if key is not None else None
        issued.append((ca.renew_certificate(ca_cert, ca_key, old, days, csr), key, cert_path, key_path))
    for cert, key, cert_path, key_path in issued:
        if key is not None:
            write_private_key(key_path, key)
        write_certificate(cert_path, cert)
    return [cert_path for _, _, cert_path, _ in issued]


# --------------------------------------------------------------------------- CLI


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Every `pki` command and group takes --quiet, before or after its verb."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's default must not overwrite a --quiet given to its group.
        self.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                          help="do not list the files written (each is otherwise a `wrote PATH: KIND` line on stderr)")

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
        help="TEST PKI (demo, tests): every party's keys in one folder: CA, coordinator, operator, orchestrator, "
        "runners, crunchers, registry.json",
        description="Write a complete test PKI for one crunch into OUT: every party's provisioning steps run in "
        "one folder, so it holds every secret (see secure_runner.pki.make_test_pki). For a deployment, each party "
        "runs its own `secure-runner pki <role>` commands on its own machine.",
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
    init.set_defaults(func=_init)
    renew_cmd.set_defaults(func=_renew)
    _add_role_commands(commands)
    return parser


def _add_role_commands(commands: argparse._SubParsersAction) -> None:
    """One command group per party (secure_runner/provisioning/), each run on that party's own machine."""
    from secure_runner.provisioning import ca, coordinator, cruncher, registry_builder, runner_host

    ca.add_commands(commands)
    for role in coordinator.SIGNER_ROLES:
        coordinator.add_commands(commands, role)
    cruncher.add_commands(commands)
    runner_host.add_commands(commands)
    registry_builder.add_commands(commands, _parse_model)


def _init(args: argparse.Namespace) -> int:
    layout = make_test_pki(args.out, args.crunch, args.model, days=args.days, ca_days=args.ca_days, force=args.force)
    key_id = key_id_for(public_key_raw(load_identity_key(layout.coordinator_identity)))
    lines = [
        f"wrote PKI for crunch {args.crunch!r} in {layout.root}",
        f"  CA:              {layout.ca_cert}  (key {layout.ca_key})",
        f"  coordinator:     {layout.coordinator_cert}  (key {layout.coordinator_key})",
        f"  coordinator key: {layout.coordinator_identity}  (key id {key_id})",
        f"  operator:        {layout.operator_cert}  (key {layout.operator_key})",
        f"  operator key:    {layout.operator_identity}  (key id "
        f"{key_id_for(public_key_raw(load_identity_key(layout.operator_identity)))})",
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
        if getattr(args, "quiet", False):
            return args.func(args)
        with reporting_writes(lambda line: print(line, file=sys.stderr, flush=True)):
            return args.func(args)
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
