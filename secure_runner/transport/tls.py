"""Mutual TLS for every channel, and what a server learns about its peer.

Servers always require a client certificate from the crunch's CA. Clients pin
the exact server identity they expect through the TLS server name
(`PeerIdentity.tls_server_name`), so a server holding another identity's
certificate fails the handshake before any request byte is sent.

Rotation: `reloading_server_credentials` serves whatever certificate, key and CA
the files hold when a connection is accepted (a changed file is picked up by the
next new connection; live connections keep theirs until `grpc.max_connection_age_ms`
recycles them). Clients renew by opening a new channel. `fetch_server_certificate`
lets a client see a server's certificate (its key, to check a runner identity
delegation) before it sends any request.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import resource
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

import secure_runner
from secure_runner.errors import AuthError, ConfigError, ErrorCode, RequestError
from secure_runner.provisioning.certs import spki_der, spki_sha256_b64url, verify_leaf
from secure_runner.smp.identity import PeerIdentity
from secure_runner.smp.token import sha256_b64url

log = logging.getLogger(__name__)

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
    ("grpc.max_concurrent_streams", 128),
    ("grpc.so_reuseport", 0),
    # Identity only: a compressed request (a few KiB on the wire, up to the message cap
    # once inflated) is refused from its grpc-encoding header, never decompressed.
    ("grpc.compression_enabled_algorithms_bitset", 1),
    # A request waits in its stream's flow-control window until the peer gate admits
    # the caller: keep that window at HTTP/2's 64 KiB instead of letting bandwidth-delay
    # probing grow it to megabytes per stream (the price: <= 64 KiB per round trip and
    # stream for requests, ample on the LAN a coordinator and its runners share).
    ("grpc.http2.bdp_probe", 0),
]


def server_options(*, handshake_timeout_ms: int = 5_000) -> list[tuple[str, object]]:
    """SERVER_OPTIONS with another TLS handshake timeout."""
    return [
        (name, handshake_timeout_ms if name == "grpc.server_handshake_timeout_ms" else value)
        for name, value in SERVER_OPTIONS
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


def file_version(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size) of a file, None if it cannot be stat'ed: what changes when it is renewed.

    The inode catches an atomic replacement (write + rename) even within one
    coarse mtime tick and at the same size, as with a renewed P-256 key file.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def file_versions(files: TlsFiles) -> tuple[tuple[int, int, int] | None, ...]:
    """`file_version` of the certificate, key and CA files."""
    return tuple(map(file_version, (files.cert, files.key, files.ca)))


def _checked_material(
    files: TlsFiles, identity: PeerIdentity, *, require_valid_now: bool
) -> tuple[bytes, bytes, bytes]:
    """Read the files and check they make a usable server identity, or raise ConfigError.

    The certificate chain and CA must parse, the key must be the certificate's, and the
    certificate must path-validate against the CA for `identity` (`cryptography`'s
    verifier: chain, key usage, the DNS SAN clients pin, exactly the one SPIFFE id);
    a replacement must also be valid now. So a half-written file, a key renewed before
    its certificate, or a certificate issued for another identity or by another CA
    never replaces a working pair, and a server never starts with one.
    """
    cert_pem, key_pem, ca_pem = files.read()
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        (ca_cert,) = x509.load_pem_x509_certificates(ca_pem)[:1]
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"unusable TLS files ({files.cert}): {exc}") from None
    if spki_der(key.public_key()) != spki_der(chain[0].public_key()):
        raise ConfigError(ErrorCode.PKI_INVALID, f"{files.key} is not the key of {files.cert}")
    now = datetime.now(timezone.utc)
    if require_valid_now and not chain[0].not_valid_before_utc <= now < chain[0].not_valid_after_utc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"{files.cert} is not valid now")
    # Dates were judged above: a first certificate is path-validated as of its own start.
    verify_leaf(chain[0], ca_cert, identity, now=now if require_valid_now else chain[0].not_valid_before_utc)
    return cert_pem, key_pem, ca_pem


class _CertificateReloader:
    """The fetcher of `reloading_server_credentials`: grpc calls it before every TLS handshake.

    It runs on a grpc core thread, so it is thread-safe (one lock) and cheap
    when nothing changed (three stat calls). Files are re-read only when one's
    (inode, mtime_ns, size) changed since the last attempt; if the new material is
    unusable, the current certificate stays in service, a warning is logged once
    for that version of the files, and the next change is tried again.
    """

    def __init__(self, files: TlsFiles, identity: PeerIdentity) -> None:
        self.files = files
        self.identity = identity
        self._lock = threading.Lock()
        self._versions = file_versions(files)
        cert, key, ca = _checked_material(files, identity, require_valid_now=False)
        self.initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self._lock:
                versions = file_versions(self.files)
                if versions == self._versions:
                    return None
                self._versions = versions  # tried once per version, whatever the outcome
                cert, key, ca = _checked_material(self.files, self.identity, require_valid_now=True)
                config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
            log.info("TLS certificate %s reloaded", self.files.cert)
            return config
        except Exception as exc:  # never let a bad file break the handshake path
            log.warning("keeping the current TLS certificate: %s", exc)
            return None


def reloading_server_credentials(files: TlsFiles, identity: PeerIdentity) -> grpc.ServerCredentials:
    """Server credentials (client certificates required) that follow changes to `files`.

    Raises ConfigError (PKI_INVALID, CERT_NOT_ISSUED_FOR_US) if the files are unusable
    for `identity` to begin with.
    """
    reloader = _CertificateReloader(files, identity)
    return grpc.dynamic_ssl_server_credentials(reloader.initial, reloader, require_client_authentication=True)


def fetch_server_certificate(
    host: str, port: int, files: TlsFiles, server_name: str, timeout: float = 5.0
) -> bytes:
    """The DER certificate a server presents, after a full mutual-TLS 1.3 handshake.

    Blocking (call it in a thread). The server must present a certificate from
    `files.ca` naming `server_name`; `files.cert`/`files.key` authenticate us.
    No application data is sent. In TLS 1.3 the server judges our certificate
    only after the client's side of the handshake is done, so a returned
    certificate says who the server is, not that it accepted us.

    Raises AuthError(PEER_UNAUTHENTICATED) when the server is not who it should
    be or the TLS handshake fails, RequestError(UNREACHABLE) when it cannot be
    reached within `timeout` seconds (including a connection closed during the
    handshake), ConfigError(PKI_INVALID) when our own files are unusable.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"cannot use TLS files {files.cert}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])  # what a gRPC server expects
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    deadline = time.monotonic() + timeout
    where = f"{host}:{port} ({server_name})"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            with context.wrap_socket(sock, server_hostname=server_name) as tls_sock:
                der = tls_sock.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        raise AuthError(
            ErrorCode.PEER_UNAUTHENTICATED, f"server {where} failed verification: {exc.verify_message}"
        ) from None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):
        raise RequestError(ErrorCode.UNREACHABLE, f"server {where} closed the connection during TLS") from None
    except ssl.SSLError as exc:
        reason = exc.reason or exc
        raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, f"TLS handshake with {where} failed: {reason}") from None
    except OSError as exc:  # refused, unreachable, timed out, name resolution
        raise RequestError(ErrorCode.UNREACHABLE, f"cannot reach {where}: {exc.strerror or exc}") from None
    if not der:
        raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, f"server {where} presented no certificate")
    return der


def spki_sha256(der_cert: bytes) -> str:
    """base64url (no padding) SHA-256 of a DER certificate's SubjectPublicKeyInfo: the key it certifies."""
    try:
        public_key = x509.load_der_x509_certificate(der_cert).public_key()
    except ValueError:
        raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, "not a DER X.509 certificate") from None
    return spki_sha256_b64url(public_key)


def check_tls13_only(host: str, port: int, files: TlsFiles, timeout: float = 5.0) -> None:
    """Fail unless the server at host:port refuses a TLS 1.2 handshake (T-1), even with a valid certificate.

    grpcio offers no TLS version setting: TLS 1.2 is off only if `secure_runner`
    was imported before grpc (see `secure_runner/__init__.py`). A server started
    otherwise would accept TLS 1.2, so it checks itself and refuses to serve.
    Blocking (call it in a thread). Raises ConfigError(PKI_INVALID).
    """
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host.strip("[]"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(files.ca)
    context.load_cert_chain(files.cert, files.key)
    context.check_hostname = False
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock) as tls_sock:
                version = tls_sock.version()
    except (ssl.SSLError, ConnectionResetError, ConnectionAbortedError):
        return  # refused during the handshake: TLS 1.2 is off
    except OSError as exc:  # fail closed: a server whose TLS versions cannot be checked does not serve
        raise ConfigError(
            ErrorCode.PKI_INVALID, f"cannot check the TLS versions of the server on port {port}: {exc}"
        ) from None
    raise ConfigError(
        ErrorCode.PKI_INVALID,
        f"the server on port {port} accepted a {version} handshake: import secure_runner before grpc (T-1)",
    )


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the limit now in force.

    Every connection holds a descriptor from accept() on, handshake finished or
    not: at the common default of 1,024, a thousand idle TCP connections make
    accept() fail and every new connection wait on grpc's accept backoff.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft
    return max(soft, target)


@functools.cache
def _warn_tls12_possible() -> None:
    log.warning("grpc was imported before secure_runner: this process's channels may negotiate TLS 1.2 (T-1)")


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    return client_credentials(files)[0]


def client_credentials(files: TlsFiles) -> tuple[grpc.ChannelCredentials, str]:
    """Credentials for a new channel, and `cert_sha256` of the certificate they present.

    Both come from one read of the files, so a token bound to that hash (`cnf`)
    matches what the channel shows even while the files are being renewed.
    """
    if not secure_runner.TLS13_ONLY:
        _warn_tls12_possible()
    cert, key, ca = files.read()
    try:
        presented = cert_sha256(pem_to_der(cert))
    except ValueError as exc:
        raise ConfigError(ErrorCode.PKI_INVALID, f"unusable certificate {files.cert}: {exc}") from None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert), presented


def channel_options(server_name: str) -> list[tuple[str, object]]:
    return [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def cert_sha256(der: bytes) -> str:
    """RFC 8705 x5t#S256: base64url SHA-256 of the DER certificate."""
    return sha256_b64url(der)


def pem_to_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class PeerCertificate:
    spiffe_ids: tuple[str, ...]
    sha256: str
    spki_sha256: bytes  # raw SHA-256 of its SubjectPublicKeyInfo: the key enrolled on chain (SMP-5a)


def peer_name(peer: PeerCertificate | None) -> str:
    """How logs and the audit trail name a peer: its one SPIFFE id, else "anonymous"."""
    return peer.spiffe_ids[0] if peer is not None and len(peer.spiffe_ids) == 1 else ANONYMOUS


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
            peer = PeerCertificate(
                uris, cert_sha256(cert.public_bytes(Encoding.DER)), hashlib.sha256(spki_der(cert.public_key())).digest()
            )
            if len(self._cache) >= self._max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[pem] = peer
        return peer
