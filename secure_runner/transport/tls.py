"""Mutual TLS for every channel, and what a server learns about its peer.

Servers always require a client certificate from the crunch's CA. Clients pin
the exact server identity they expect through the TLS server name
(`PeerIdentity.tls_server_name`), so a server holding another identity's
certificate fails the handshake before any request byte is sent.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_runner.errors import ConfigError, ErrorCode

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024

# Applied to every server: idle or stalled TLS handshakes are dropped, and live
# connections are recycled so a revoked certificate stops working in bounded time.
SERVER_OPTIONS = [
    ("grpc.server_handshake_timeout_ms", 5_000),
    ("grpc.max_connection_age_ms", 10 * 60_000),
    ("grpc.max_connection_age_grace_ms", 60_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for one party: its certificate, its private key and the crunch CA."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        except OSError as exc:
            raise ConfigError(ErrorCode.PKI_INVALID, f"cannot read TLS file: {exc}") from None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    cert, key, ca = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel_options(server_name: str) -> list[tuple[str, object]]:
    return [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def cert_sha256(der: bytes) -> str:
    """RFC 8705 x5t#S256: base64url SHA-256 of the DER certificate."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def pem_to_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


@dataclass(frozen=True)
class PeerCertificate:
    spiffe_ids: tuple[str, ...]
    sha256: str


class PeerCertificates:
    """Per-connection facts about the client certificate, cached by its PEM.

    Parsing the certificate on every call would cost more than the signature
    check; the cache is bounded and keyed by the exact PEM grpc reports.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        self._cache: dict[bytes, PeerCertificate] = {}
        self._max_entries = max_entries

    def from_auth_context(self, auth_context: dict[str, list[bytes]]) -> PeerCertificate | None:
        pems = auth_context.get("x509_pem_cert") or []
        if len(pems) != 1:
            return None
        pem = pems[0]
        peer = self._cache.get(pem)
        if peer is None:
            cert = x509.load_pem_x509_certificate(pem)
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
            except x509.ExtensionNotFound:
                uris = ()
            peer = PeerCertificate(uris, cert_sha256(cert.public_bytes(Encoding.DER)))
            if len(self._cache) >= self._max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[pem] = peer
        return peer
