"""What every party does with X.509: ask for a certificate for its own key, and check the one it gets back.

A party (coordinator, operator, runner host) makes its P-256 TLS key on its own machine
and sends the crunch operator a CSR that names the identity it asks for (one SPIFFE URI
SAN and its DNS SAN). The CSR is only a request: the CA takes the identity it writes
into the certificate from the operator's approval (provisioning/ca.py), never from here.

`verify_leaf` is the check a certificate gets before it is trusted on disk: a real path
validation (`cryptography.x509.verification`, RFC 5280 with the CA/Browser Forum profile:
chain to the crunch CA, dates, key usage, EKU for the role, the DNS SAN for server
roles), then the exact SPIFFE URI and, when installing, that it certifies our own key.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from secure_runner.errors import AuthError, ConfigError, ErrorCode
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.token import sha256_b64url

SERVER_ROLES = frozenset({Role.ORCHESTRATOR, Role.RUNNER})  # roles that accept TLS connections


def generate_tls_key() -> ec.EllipticCurvePrivateKey:
    """A new P-256 TLS key (see pki.py for why not Ed25519)."""
    return ec.generate_private_key(ec.SECP256R1())


def spki_der(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def spki_sha256_b64url(public_key: CertificatePublicKeyTypes) -> str:
    """What delegations and call tokens name a TLS key by (smp/token.py: `spki`, `dst`)."""
    return sha256_b64url(spki_der(public_key))


def spki_sha256_hex(public_key: CertificatePublicKeyTypes) -> str:
    """The certificate hash a chain registry stores for a coordinator: SHA-256 of the SPKI DER, hex."""
    return hashlib.sha256(spki_der(public_key)).hexdigest()


def subject_of(identity: PeerIdentity) -> x509.Name:
    """O = crunch, OU = role, CN = id: informative only (authorization reads the URI SAN)."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.crunch_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(identity.role)),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.ident),
        ]
    )


def sans_of(identity: PeerIdentity) -> x509.SubjectAlternativeName:
    """Exactly one URI SAN (what authorization reads) and one DNS SAN (what clients pin)."""
    return x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(identity.spiffe_id), x509.DNSName(identity.tls_server_name)]
    )


def make_csr(key: ec.EllipticCurvePrivateKey, identity: PeerIdentity) -> x509.CertificateSigningRequest:
    """A CSR for `key` asking for `identity`."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject_of(identity))
        .add_extension(sans_of(identity), critical=False)
        .sign(key, hashes.SHA256())
    )


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A PEM CSR whose self-signature verifies (the requester holds the key); CSR_INVALID otherwise."""
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise ConfigError(ErrorCode.CSR_INVALID, "not a PEM certificate signing request") from None
    try:
        valid = csr.is_signature_valid
    except UnsupportedAlgorithm:
        valid = False
    if not valid:
        raise ConfigError(ErrorCode.CSR_INVALID, "the CSR's signature does not verify: no proof its sender holds the key")
    return csr


def uri_sans(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        san = cert_or_csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def identity_of(cert: x509.Certificate) -> PeerIdentity:
    """The identity a certificate of ours names: its one SPIFFE URI SAN."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise ConfigError(ErrorCode.CERT_NOT_ISSUED_FOR_US, f"a certificate must name exactly one SPIFFE id, it names {len(uris)}")
    try:
        return PeerIdentity.parse(uris[0])
    except AuthError:  # on the wire that is an unauthenticated peer; here, a certificate not ours
        raise ConfigError(ErrorCode.CERT_NOT_ISSUED_FOR_US, f"not a secure-runner SPIFFE id: {uris[0][:200]!r}") from None


def verify_leaf(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    identity: PeerIdentity,
    *,
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey | None = None,
    now: datetime | None = None,
) -> None:
    """Path-validate `cert` against `ca_cert` for `identity` (and `key`); CERT_NOT_ISSUED_FOR_US if anything differs.

    Server roles are validated as servers for their DNS SAN (serverAuth), client roles as
    clients (clientAuth); both then must carry exactly the one URI SAN `identity.spiffe_id`.
    """
    policy = PolicyBuilder().store(Store([ca_cert])).time(now or datetime.now(timezone.utc))
    try:
        if identity.role in SERVER_ROLES:
            policy.build_server_verifier(x509.DNSName(identity.tls_server_name)).verify(cert, [])
        else:
            policy.build_client_verifier().verify(cert, [])
    except VerificationError as exc:
        raise ConfigError(
            ErrorCode.CERT_NOT_ISSUED_FOR_US, f"the certificate does not validate for {identity.spiffe_id}: {exc}"
        ) from None
    if uri_sans(cert) != [identity.spiffe_id]:
        raise ConfigError(ErrorCode.CERT_NOT_ISSUED_FOR_US, f"the certificate does not name exactly {identity.spiffe_id}")
    if key is not None:
        public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
        if spki_der(cert.public_key()) != spki_der(public):
            raise ConfigError(ErrorCode.CERT_NOT_ISSUED_FOR_US, "the certificate certifies another key than ours")
