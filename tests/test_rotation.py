"""Certificate rotation without a restart, and the server-certificate fetch a client does before any request.

A real grpc.aio server with `reloading_server_credentials` on loopback, real
certificates from `pki`, real handshakes from Python's `ssl` and from grpc.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from secure_runner import pki
from secure_runner.errors import AuthError, ConfigError, ErrorCode, RequestError
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.transport import tls

CRUNCH = "rot"
MODELS = [pki.ModelSpec("m1", "One", "alice", "Alice"), pki.ModelSpec("m2", "Two", "bob", "Bob")]
RUNNER_M1 = PeerIdentity.make(CRUNCH, Role.RUNNER, "m1")
M1 = RUNNER_M1.tls_server_name
M2 = PeerIdentity.make(CRUNCH, Role.RUNNER, "m2").tls_server_name


@pytest.fixture
def layout(tmp_path: Path) -> pki.PkiLayout:
    return pki.make_test_pki(tmp_path / "pki", CRUNCH, MODELS)


@pytest.fixture(scope="module")
def other_layout(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiLayout:
    """Same crunch and names, another CA."""
    return pki.make_test_pki(tmp_path_factory.mktemp("other") / "pki", CRUNCH, MODELS)


def _runner_files(layout: pki.PkiLayout, model_id: str = "m1") -> tls.TlsFiles:
    return tls.TlsFiles(layout.runner_cert(model_id), layout.runner_key(model_id), layout.ca_cert)


def _coordinator_files(layout: pki.PkiLayout) -> tls.TlsFiles:
    return tls.TlsFiles(layout.coordinator_cert, layout.coordinator_key, layout.ca_cert)


@contextlib.asynccontextmanager
async def _server(files: tls.TlsFiles) -> AsyncIterator[int]:
    """A health server that is runner m1 (its certificate must path-validate as that identity)."""
    server = grpc.aio.server(options=tls.SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.reloading_server_credentials(files, RUNNER_M1))
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def _channel(port: int, layout: pki.PkiLayout, server_name: str) -> grpc.aio.Channel:
    # A local subchannel pool: a new channel is a new connection (grpc may otherwise share one).
    options = [*tls.channel_options(server_name), ("grpc.use_local_subchannel_pool", 1)]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(_coordinator_files(layout)), options)


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


async def _fetch(port: int, layout: pki.PkiLayout, server_name: str = M1, **kwargs) -> x509.Certificate:
    files = _coordinator_files(layout)
    der = await asyncio.to_thread(tls.fetch_server_certificate, "127.0.0.1", port, files, server_name, **kwargs)
    return x509.load_der_x509_certificate(der)


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, as `pki` does."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


SERVING = health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- rotation


async def test_renewed_certificate_is_served_without_a_restart(layout: pki.PkiLayout) -> None:
    async with _server(_runner_files(layout)) as port:
        old_channel = _channel(port, layout, M1)
        assert await _health(old_channel) == SERVING
        first = await _fetch(port, layout)
        assert first == pki.load_certificate(layout.runner_cert("m1"))

        renewed = pki.renew(layout)
        assert layout.runner_cert("m1") in renewed
        second = await _fetch(port, layout)
        assert second == pki.load_certificate(layout.runner_cert("m1"))
        assert second.serial_number != first.serial_number
        spki = [tls.spki_sha256(c.public_bytes(Encoding.DER)) for c in (first, second)]
        assert spki[0] == spki[1], "renewal keeps the key a runner delegation binds"

        pki.renew(layout, new_keys=True)
        third = await _fetch(port, layout)
        assert third == pki.load_certificate(layout.runner_cert("m1"))
        assert tls.spki_sha256(third.public_bytes(Encoding.DER)) != spki[0]

        new_channel = _channel(port, layout, M1)
        assert await _health(new_channel) == SERVING
        assert await _health(old_channel) == SERVING, "live connections keep working"
        assert await _fetch(port, layout) == third
        await asyncio.gather(old_channel.close(), new_channel.close())


async def test_grpc_handshakes_use_the_new_files(
    layout: pki.PkiLayout, other_layout: pki.PkiLayout, tmp_path: Path
) -> None:
    """Rotate a server to another CA (same identity): only the CA a grpc client trusts tells them apart."""
    files = tls.TlsFiles(tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt")
    for source, target in zip(_runner_files(layout).__dict__.values(), files.__dict__.values(), strict=True):
        target.write_bytes(source.read_bytes())
    async with _server(files) as port:
        old_channel = _channel(port, layout, M1)
        assert await _health(old_channel) == SERVING

        _replace(files.key, other_layout.runner_key("m1").read_bytes())
        _replace(files.cert, other_layout.runner_cert("m1").read_bytes())
        _replace(files.ca, other_layout.ca_cert.read_bytes())

        of_the_new_ca = _channel(port, other_layout, M1)
        assert await _health(of_the_new_ca) == SERVING
        of_the_old_ca = _channel(port, layout, M1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _health(of_the_old_ca)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _health(old_channel) == SERVING  # a live connection keeps its handshake
        await asyncio.gather(old_channel.close(), of_the_new_ca.close(), of_the_old_ca.close())


async def test_unusable_new_files_keep_the_current_certificate(
    layout: pki.PkiLayout, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = tls.TlsFiles(tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt")
    for source, target in zip(_runner_files(layout).__dict__.values(), files.__dict__.values(), strict=True):
        target.write_bytes(source.read_bytes())
    ca = pki.load_certificate(layout.ca_cert)
    ca_key = pki.load_private_key(layout.ca_key)
    caplog.set_level(logging.WARNING, logger="secure_runner.transport.tls")
    async with _server(files) as port:
        first = await _fetch(port, layout)

        # Half-written in place (not atomically): still the old certificate, still serving.
        good_pem = files.cert.read_bytes()
        files.cert.write_bytes(good_pem[: len(good_pem) // 2])
        assert await _fetch(port, layout) == first
        channel = _channel(port, layout, M1)
        assert await _health(channel) == SERVING
        await channel.close()
        assert "keeping the current TLS certificate" in caplog.text

        # A complete new certificate whose key is not written yet: still the old pair.
        new_cert, new_key = pki.issue_certificate(ca, ca_key, PeerIdentity.make(CRUNCH, Role.RUNNER, "m1"))
        pki.write_certificate(files.cert, new_cert)
        assert await _fetch(port, layout) == first

        # The key arrives: the new pair is served.
        pki.write_private_key(files.key, new_key)
        assert await _fetch(port, layout) == new_cert

        # A complete pair from the right CA, but for another identity: never taken up.
        other_cert, other_key = pki.issue_certificate(ca, ca_key, PeerIdentity.make(CRUNCH, Role.RUNNER, "m2"))
        pki.write_private_key(files.key, other_key)
        pki.write_certificate(files.cert, other_cert)
        assert await _fetch(port, layout) == new_cert
        assert "does not validate for spiffe://rot/runner/m1" in caplog.text
        pki.write_certificate(files.cert, new_cert)
        pki.write_private_key(files.key, new_key)

        # Garbage in the server's CA file: the current configuration stays, clients still get in.
        _replace(files.ca, b"not a certificate\n")
        channel = _channel(port, layout, M1)
        assert await _health(channel) == SERVING
        await channel.close()
        assert await _fetch(port, layout) == new_cert


def test_unusable_files_at_start_are_a_config_error(layout: pki.PkiLayout) -> None:
    mismatched = tls.TlsFiles(layout.runner_cert("m1"), layout.runner_key("m2"), layout.ca_cert)
    for files in (mismatched, tls.TlsFiles(layout.ca_key, layout.runner_key("m1"), layout.ca_cert)):
        with pytest.raises(ConfigError) as err:
            tls.reloading_server_credentials(files, RUNNER_M1)
        assert err.value.code == ErrorCode.PKI_INVALID
    # A sound pair of the crunch CA, issued for another identity: path validation refuses it.
    with pytest.raises(ConfigError) as err:
        tls.reloading_server_credentials(_runner_files(layout, "m2"), RUNNER_M1)
    assert err.value.code == ErrorCode.CERT_NOT_ISSUED_FOR_US


# --------------------------------------------------------------------------- fetch_server_certificate


async def test_fetch_refuses_another_ca_and_another_name(
    layout: pki.PkiLayout, other_layout: pki.PkiLayout
) -> None:
    async with _server(_runner_files(layout)) as port:
        with pytest.raises(AuthError) as err:
            await _fetch(port, other_layout)  # trusts another CA
        assert err.value.code == ErrorCode.PEER_UNAUTHENTICATED
        with pytest.raises(AuthError) as err:
            await _fetch(port, layout, M2)  # pins another runner
        assert err.value.code == ErrorCode.PEER_UNAUTHENTICATED
        assert "m2" in err.value.message
        assert (await _fetch(port, layout)).subject == pki.load_certificate(layout.runner_cert("m1")).subject
    async with _server(_runner_files(other_layout)) as port:  # a server of another CA, right name
        with pytest.raises(AuthError):
            await _fetch(port, layout)


def test_fetch_unreachable_and_silent_servers(layout: pki.PkiLayout) -> None:
    files = _coordinator_files(layout)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(RequestError) as err:
        tls.fetch_server_certificate("127.0.0.1", closed_port, files, M1, timeout=2)
    assert err.value.code == ErrorCode.UNREACHABLE

    with socket.socket() as silent:  # accepts TCP (backlog) but never answers the TLS hello
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        with pytest.raises(RequestError) as err:
            tls.fetch_server_certificate("127.0.0.1", silent.getsockname()[1], files, M1, timeout=0.3)
        assert err.value.code == ErrorCode.UNREACHABLE
        assert time.monotonic() - started < 2


def test_spki_sha256_is_the_key_hash() -> None:
    ca, ca_key = pki.generate_ca(CRUNCH)
    cert, key = pki.issue_certificate(ca, ca_key, PeerIdentity.make(CRUNCH, Role.RUNNER, "m1"))
    der = cert.public_bytes(Encoding.DER)
    spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    expected = base64.urlsafe_b64encode(hashlib.sha256(spki).digest()).rstrip(b"=").decode()
    assert tls.spki_sha256(der) == expected and len(expected) == 43
    assert tls.spki_sha256(der) != tls.cert_sha256(der)
    with pytest.raises(AuthError):
        tls.spki_sha256(b"not der")


def test_server_options() -> None:
    options = dict(tls.SERVER_OPTIONS)
    assert options["grpc.max_concurrent_streams"] == 128
    assert dict(tls.server_options(handshake_timeout_ms=250))["grpc.server_handshake_timeout_ms"] == 250
    assert dict(tls.server_options()) == options


# --------------------------------------------------------------------------- pki renew


def _san_uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier) + san.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("new_keys", [False, True], ids=["same-keys", "new-keys"])
def test_renew_keeps_ca_registry_and_identity_keys(
    layout: pki.PkiLayout, capsys: pytest.CaptureFixture, new_keys: bool
) -> None:
    leaves = [layout.coordinator_cert, layout.operator_cert, layout.orchestrator_cert, layout.runner_cert("m1"),
              layout.runner_cert("m2")]
    keys = [layout.coordinator_key, layout.operator_key, layout.orchestrator_key, layout.runner_key("m1"),
            layout.runner_key("m2")]
    kept = [layout.ca_cert, layout.ca_key, layout.registry, layout.coordinator_identity, layout.operator_identity]
    kept += [layout.cruncher_identity(c) for c in ("alice", "bob")]
    before = {path: path.read_bytes() for path in leaves + keys + kept}
    old = {path: pki.load_certificate(path) for path in leaves}

    assert pki.main(["renew", str(layout.root), "--days", "2", *(["--new-keys"] if new_keys else [])]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("renewed 5 certificates")

    ca = pki.load_certificate(layout.ca_cert)
    for path in kept:
        assert path.read_bytes() == before[path], path
    for path in keys:
        # Kept by default: runner delegations bind the TLS key.
        assert (path.read_bytes() != before[path]) is new_keys, path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for cert_path, key_path in zip(leaves, keys, strict=True):
        assert str(cert_path) in printed
        new = pki.load_certificate(cert_path)
        new.verify_directly_issued_by(ca)
        assert _san_uris(new) == _san_uris(old[cert_path]) and new.subject == old[cert_path].subject
        assert new.serial_number != old[cert_path].serial_number
        assert new.not_valid_after_utc - new.not_valid_before_utc == timedelta(days=2) + pki.CLOCK_SKEW
        pub = Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        assert pki.load_private_key(key_path).public_key().public_bytes(*pub) == new.public_key().public_bytes(*pub)
    assert not list(layout.root.rglob("*.tmp"))
    assert pki.renew(layout) == leaves  # the library call returns the certificates it wrote


def test_renew_of_an_empty_or_missing_layout_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError):
        pki.renew(pki.PkiLayout(tmp_path / "nothing"))
    assert pki.main(["renew", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("secure-runner pki: error: PKI_INVALID")
