"""The PKI: real certificates, real key files, and a real mutual-TLS handshake over gRPC."""

from __future__ import annotations

import base64
import contextlib
import stat
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.pki import (
    ModelSpec,
    PkiLayout,
    generate_ca,
    generate_identity_key,
    issue_certificate,
    issue_runner_certificate,
    key_id_for,
    load_certificate,
    load_identity_key,
    load_private_key,
    main,
    make_test_pki,
    public_key_raw,
    renew,
    write_certificate,
    write_private_key,
)
from secure_runner.provisioning.certs import verify_leaf
from secure_runner.smp.identity import PeerIdentity, Role, validate_id
from secure_runner.smp.registry import Registry

CRUNCH = "c1"
MODELS = [
    ModelSpec("m1", "Model One", "alice", "Alice"),
    ModelSpec("m2", "Model Two", "alice", "Alice"),
    ModelSpec("m3", "Model Three", "bob", "Bob"),
    ModelSpec("m4"),  # no cruncher: no identity key, no identity_public_key
]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return make_test_pki(tmp_path_factory.mktemp("pki") / "out", CRUNCH, MODELS)


@pytest.fixture(scope="module")
def other_layout(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    """Same crunch and ids, but a different CA."""
    return make_test_pki(tmp_path_factory.mktemp("pki-other") / "out", CRUNCH, MODELS)


def _coordinator_key_id(layout: PkiLayout) -> str:
    return key_id_for(public_key_raw(load_identity_key(layout.coordinator_identity)))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- files and registry


def test_layout_files_exist_and_private_keys_are_0600(layout: PkiLayout) -> None:
    public = [layout.ca_cert, layout.coordinator_cert, layout.orchestrator_cert, layout.registry]
    public += [layout.runner_cert(m.model_id) for m in MODELS]
    private = [layout.ca_key, layout.coordinator_key, layout.coordinator_identity, layout.orchestrator_key]
    private += [layout.runner_key(m.model_id) for m in MODELS]
    private += [layout.cruncher_identity(c) for c in ("alice", "bob")]
    for path in public + private:
        assert path.is_file(), path
    for path in private:
        assert _mode(path) == 0o600, path
    assert sorted(p.name for p in layout.crunchers_dir.iterdir()) == ["alice", "bob"]
    assert not list(layout.root.rglob("*.tmp")), "no temporary files left behind"


def test_registry_names_the_coordinator_key_and_every_model(layout: PkiLayout) -> None:
    registry = Registry.from_json(layout.registry.read_bytes())
    crunch = registry.crunches[CRUNCH]

    identity = load_identity_key(layout.coordinator_identity)
    raw = public_key_raw(identity)
    [coordinator] = crunch.coordinators
    assert coordinator.key_id == key_id_for(raw)
    assert coordinator.public_key_bytes == raw
    assert base64.b64decode(coordinator.public_key) == raw
    now = datetime.now(timezone.utc)
    assert registry.coordinator_key(CRUNCH, coordinator.key_id, now) == coordinator
    assert coordinator.not_before is not None and coordinator.not_after is not None
    assert coordinator.not_before < now - timedelta(minutes=4)
    assert abs(coordinator.not_after - (now + timedelta(days=30))) < timedelta(minutes=1)

    # The coordinator's TLS certificate names its signing key id.
    uris = load_certificate(layout.coordinator_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [PeerIdentity.make(CRUNCH, Role.COORDINATOR, coordinator.key_id).spiffe_id]

    cruncher_pub = {c: public_key_raw(load_identity_key(layout.cruncher_identity(c))) for c in ("alice", "bob")}
    assert cruncher_pub["alice"] != cruncher_pub["bob"]
    assert [m.model_id for m in crunch.models] == [m.model_id for m in MODELS]
    for spec in MODELS:
        entry = registry.model(CRUNCH, spec.model_id)
        assert entry is not None
        assert (entry.model_name, entry.cruncher_id, entry.cruncher_name) == (
            spec.model_name, spec.cruncher_id, spec.cruncher_name,
        )  # fmt: skip
        if spec.cruncher_id:
            assert base64.b64decode(entry.identity_public_key or "") == cruncher_pub[spec.cruncher_id]
        else:
            assert entry.identity_public_key is None


def test_key_id_is_a_valid_id() -> None:
    raw = public_key_raw(generate_identity_key())
    key_id = key_id_for(raw)
    assert validate_id(key_id) == key_id
    assert len(key_id) == 25 and key_id.startswith("k")
    with pytest.raises(ConfigError):
        key_id_for(b"short")


# --------------------------------------------------------------------------- certificates


def test_ca_certificate(layout: PkiLayout) -> None:
    ca = load_certificate(layout.ca_cert)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and isinstance(ca.public_key().curve, ec.SECP256R1)
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"secure-runner CA {CRUNCH}"
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == timedelta(days=30, minutes=5)


def _leaves(layout: PkiLayout) -> list[tuple[PeerIdentity, Path]]:
    leaves = [
        (PeerIdentity.make(CRUNCH, Role.COORDINATOR, _coordinator_key_id(layout)), layout.coordinator_cert),
        (PeerIdentity.make(CRUNCH, Role.ORCHESTRATOR, "orchestrator"), layout.orchestrator_cert),
    ]
    leaves += [(PeerIdentity.make(CRUNCH, Role.RUNNER, m.model_id), layout.runner_cert(m.model_id)) for m in MODELS]
    return leaves


def _check_leaf(cert: x509.Certificate, ca: x509.Certificate, identity: PeerIdentity, days: int = 7) -> None:
    cert.verify_directly_issued_by(ca)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [identity.spiffe_id]
    assert san.get_values_for_type(x509.DNSName) == [identity.tls_server_name]
    assert len(list(san)) == 2
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    serves = identity.role in (Role.RUNNER, Role.ORCHESTRATOR)  # coordinators and operators only connect
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH} | ({ExtendedKeyUsageOID.SERVER_AUTH} if serves else set())
    verify_leaf(cert, ca, identity)  # RFC 5280 path validation: chain, dates, EKU, DNS SAN, exact SPIFFE id
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    now = datetime.now(timezone.utc)
    assert now - timedelta(minutes=6) < cert.not_valid_before_utc < now - timedelta(minutes=4)
    assert abs(cert.not_valid_after_utc - (now + timedelta(days=days))) < timedelta(minutes=1)


def test_leaf_certificates(layout: PkiLayout) -> None:
    ca = load_certificate(layout.ca_cert)
    serials = set()
    for identity, path in _leaves(layout):
        cert = load_certificate(path)
        _check_leaf(cert, ca, identity)
        serials.add(cert.serial_number)
    assert len(serials) == len(MODELS) + 2


def test_leaf_from_another_ca_does_not_verify(layout: PkiLayout, other_layout: PkiLayout) -> None:
    ca = load_certificate(layout.ca_cert)
    with pytest.raises((InvalidSignature, ValueError)):
        load_certificate(other_layout.runner_cert("m1")).verify_directly_issued_by(ca)


def test_leaf_never_outlives_its_ca() -> None:
    ca, ca_key = generate_ca(CRUNCH, days=1)
    cert, _ = issue_certificate(ca, ca_key, PeerIdentity.make(CRUNCH, Role.RUNNER, "m1"), days=7)
    assert cert.not_valid_after_utc == ca.not_valid_after_utc
    other_ca, _ = generate_ca(CRUNCH)
    with pytest.raises(ConfigError) as err:  # key does not match the certificate
        issue_certificate(other_ca, ca_key, PeerIdentity.make(CRUNCH, Role.RUNNER, "m1"))
    assert err.value.code == ErrorCode.PKI_INVALID


def test_renew_reads_no_leaf_private_key(tmp_path: Path) -> None:
    """The CA renews from the certificate's public key (K-2): a leaf key it cannot read changes nothing."""
    layout = make_test_pki(tmp_path / "out", CRUNCH, [ModelSpec("m1")])
    old = load_certificate(layout.runner_cert("m1"))
    layout.runner_key("m1").write_bytes(b"not a key the CA could load")
    renew(layout, days=2)
    new = load_certificate(layout.runner_cert("m1"))
    assert new.serial_number != old.serial_number and new.public_key() == old.public_key()
    assert layout.runner_key("m1").read_bytes() == b"not a key the CA could load"  # untouched
    verify_leaf(new, load_certificate(layout.ca_cert), PeerIdentity.make(CRUNCH, Role.RUNNER, "m1"))


def test_issue_runner_certificate(tmp_path: Path) -> None:
    layout = make_test_pki(tmp_path / "pki", CRUNCH, [ModelSpec("m1")])
    ca = load_certificate(layout.ca_cert)
    before = load_certificate(layout.runner_cert("m1"))

    cert = issue_runner_certificate(layout, "m1", days=2)
    assert load_certificate(layout.runner_cert("m1")) == cert != before
    _check_leaf(cert, ca, PeerIdentity.make(CRUNCH, Role.RUNNER, "m1"), days=2)

    new = issue_runner_certificate(layout, "discovered-7")
    _check_leaf(new, ca, PeerIdentity.make(CRUNCH, Role.RUNNER, "discovered-7"))
    assert _mode(layout.runner_key("discovered-7")) == 0o600
    assert isinstance(load_private_key(layout.runner_key("discovered-7")), ec.EllipticCurvePrivateKey)

    with pytest.raises(ConfigError):
        issue_runner_certificate(layout, "../escape")


# --------------------------------------------------------------------------- file helpers


def test_write_private_key_tightens_an_existing_wide_file(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_text("old")
    path.chmod(0o644)
    key = generate_identity_key()
    write_private_key(path, key)
    assert _mode(path) == 0o600
    assert public_key_raw(load_identity_key(path)) == public_key_raw(key)


def test_loaders_refuse_garbage_with_pki_invalid(tmp_path: Path, layout: PkiLayout) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = [
        lambda: load_certificate(garbage),
        lambda: load_certificate(tmp_path / "missing.crt"),
        lambda: load_certificate(layout.ca_key),
        lambda: load_private_key(garbage),
        lambda: load_private_key(layout.ca_cert),
        lambda: load_private_key(tmp_path),  # a directory
        lambda: load_identity_key(layout.runner_key("m1")),  # EC, not Ed25519
    ]
    for case in cases:
        with pytest.raises(ConfigError) as err:
            case()
        assert err.value.code == ErrorCode.PKI_INVALID
        assert "Traceback" not in err.value.message


def test_certificate_round_trip(tmp_path: Path) -> None:
    ca, _ = generate_ca("x")
    write_certificate(tmp_path / "ca.crt", ca)
    assert load_certificate(tmp_path / "ca.crt") == ca


# --------------------------------------------------------------------------- make_test_pki rules


def test_refuses_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = make_test_pki(out, CRUNCH, [ModelSpec("m1"), ModelSpec("old")])
    old_ca = first.ca_cert.read_bytes()
    with pytest.raises(ConfigError) as err:
        make_test_pki(out, CRUNCH, [ModelSpec("m1")])
    assert err.value.code == ErrorCode.PKI_INVALID
    assert first.ca_cert.read_bytes() == old_ca

    (out / "notes.txt").write_text("mine")
    second = make_test_pki(out, CRUNCH, [ModelSpec("m1")], force=True)
    assert second.ca_cert.read_bytes() != old_ca
    assert not second.runners_dir.joinpath("old").exists(), "stale runner of the old CA removed"
    assert (out / "notes.txt").read_text() == "mine", "files that are not ours are kept"
    load_certificate(second.runner_cert("m1")).verify_directly_issued_by(load_certificate(second.ca_cert))


@pytest.mark.parametrize(
    ("crunch", "models"),
    [
        ("Bad_Crunch", [ModelSpec("m1")]),
        (CRUNCH, [ModelSpec("-m1")]),
        (CRUNCH, [ModelSpec("m1", cruncher_id="Alice")]),
        (CRUNCH, [ModelSpec("m1"), ModelSpec("m1")]),
        (CRUNCH, [ModelSpec("m1", "", "a", "A"), ModelSpec("m2", "", "a", "B")]),
        (CRUNCH, [ModelSpec("m1", cruncher_name="nobody")]),
    ],
)
def test_invalid_input_writes_nothing(tmp_path: Path, crunch: str, models: list[ModelSpec]) -> None:
    with pytest.raises(ConfigError):
        make_test_pki(tmp_path / "out", crunch, models)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- real mutual TLS


WHO_METHOD = "/secure_runner.test.Peer/Who"


@contextlib.asynccontextmanager
async def _server(layout: PkiLayout, model_id: str, seen: list[dict[str, list[bytes]]]) -> AsyncIterator[int]:
    """A grpc.aio server holding `model_id`'s runner certificate and requiring client certificates."""

    async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        auth = {key: list(values) for key, values in context.auth_context().items()}
        seen.append(auth)
        return b"".join(auth.get("peer_spiffe_id", []))

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "secure_runner.test.Peer", {"Who": grpc.unary_unary_rpc_method_handler(who)}
            )
        ]
    )
    credentials = grpc.ssl_server_credentials(
        [(layout.runner_key(model_id).read_bytes(), layout.runner_cert(model_id).read_bytes())],
        root_certificates=layout.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def _channel(port: int, ca: PkiLayout, cert: Path, key: Path, server_name: str) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(ca.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", server_name)]
    )


RUNNER_M1 = PeerIdentity.make(CRUNCH, Role.RUNNER, "m1")


async def test_mutual_tls_health_and_peer_spiffe_id(layout: PkiLayout) -> None:
    seen: list[dict[str, list[bytes]]] = []
    async with _server(layout, "m1", seen) as port:
        channel = _channel(port, layout, layout.coordinator_cert, layout.coordinator_key, RUNNER_M1.tls_server_name)
        async with channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            spiffe = await channel.unary_unary(WHO_METHOD)(b"", timeout=5)

    coordinator = PeerIdentity.make(CRUNCH, Role.COORDINATOR, _coordinator_key_id(layout))
    assert spiffe.decode() == coordinator.spiffe_id
    [auth] = seen
    # What grpcio 1.85 puts in the auth context of an mTLS peer (the next layer relies on these).
    assert auth["transport_security_type"] == [b"ssl"]
    assert auth["peer_spiffe_id"] == [coordinator.spiffe_id.encode()]
    assert auth["peer_uri"] == [coordinator.spiffe_id.encode()]
    assert auth["peer_dns"] == [coordinator.tls_server_name.encode()]
    assert auth["x509_subject_alternative_name"] == [
        coordinator.spiffe_id.encode(),
        coordinator.tls_server_name.encode(),
    ]
    assert auth["security_level"] == [b"TSI_PRIVACY_AND_INTEGRITY"]
    assert auth["ssl_requested_server_name"] == [RUNNER_M1.tls_server_name.encode()]
    # The peer's full certificate is available, e.g. to bind a token to it.
    [pem] = auth["x509_pem_cert"]
    peer_cert = x509.load_pem_x509_certificate(pem)
    expected = load_certificate(layout.coordinator_cert)
    assert peer_cert.fingerprint(hashes.SHA256()) == expected.fingerprint(hashes.SHA256())


async def test_orchestrator_certificate_works_as_a_client(layout: PkiLayout) -> None:
    seen: list[dict[str, list[bytes]]] = []
    async with _server(layout, "m2", seen) as port:
        server_name = PeerIdentity.make(CRUNCH, Role.RUNNER, "m2").tls_server_name
        async with _channel(port, layout, layout.orchestrator_cert, layout.orchestrator_key, server_name) as channel:
            spiffe = await channel.unary_unary(WHO_METHOD)(b"", timeout=5)
    assert spiffe.decode() == PeerIdentity.make(CRUNCH, Role.ORCHESTRATOR, "orchestrator").spiffe_id


async def test_client_certificate_from_another_ca_is_refused(layout: PkiLayout, other_layout: PkiLayout) -> None:
    seen: list[dict[str, list[bytes]]] = []
    async with _server(layout, "m1", seen) as port:
        # Trusts the right CA for the server, but presents a certificate from another CA.
        channel = _channel(
            port, layout, other_layout.coordinator_cert, other_layout.coordinator_key, RUNNER_M1.tls_server_name
        )
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert seen == []


async def test_client_pinning_another_runner_name_fails(layout: PkiLayout) -> None:
    seen: list[dict[str, list[bytes]]] = []
    async with _server(layout, "m1", seen) as port:
        wrong = PeerIdentity.make(CRUNCH, Role.RUNNER, "m2").tls_server_name
        async with _channel(port, layout, layout.coordinator_cert, layout.coordinator_key, wrong) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(WHO_METHOD)(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert seen == []


# --------------------------------------------------------------------------- CLI


def test_cli_init_writes_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert main(["init", str(out), "--crunch", "c1", "--model", "m1:Model One:alice:Alice", "--model", "m2"]) == 0
    layout = PkiLayout(out)
    for path in (layout.ca_cert, layout.coordinator_cert, layout.coordinator_identity, layout.orchestrator_cert,
                 layout.runner_cert("m1"), layout.runner_cert("m2"), layout.cruncher_identity("alice")):  # fmt: skip
        assert path.is_file()
    entry = Registry.from_json(layout.registry.read_bytes()).model("c1", "m1")
    assert entry is not None and (entry.model_name, entry.cruncher_id, entry.cruncher_name) == (
        "Model One", "alice", "Alice",
    )  # fmt: skip
    captured = capsys.readouterr()
    printed = captured.out
    assert _coordinator_key_id(layout) in printed
    assert str(layout.runner_cert("m1")) in printed
    # Every file written is a line on stderr: its path and kind, for a certificate its subject and expiry.
    wrote = {line.split(": ", 1)[0].removeprefix("wrote "): line.split(": ", 1)[1] for line in captured.err.splitlines()}
    assert all(line.startswith("wrote ") for line in captured.err.splitlines())
    assert set(wrote) == {str(p) for p in out.rglob("*") if p.is_file()}
    assert wrote[str(layout.ca_key)] == wrote[str(layout.runner_key("m1"))] == "ECDSA P-256 private key, mode 0600"
    assert wrote[str(layout.coordinator_identity)] == "Ed25519 private key, mode 0600"
    runner_cert = load_certificate(layout.runner_cert("m1"))
    assert wrote[str(layout.runner_cert("m1"))] == (
        f"certificate, subject {runner_cert.subject.rfc4514_string()}, spiffe://c1/runner/m1, "
        f"expires {runner_cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    )
    assert wrote[str(layout.ca_cert)].startswith("CA certificate, subject CN=") and wrote[str(layout.registry)] == "registry"

    # Again without --force: refused; with --force: fine; --quiet (before or after the verb) lists nothing.
    assert main(["init", str(out), "--crunch", "c1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["init", str(out), "--crunch", "c1", "--force", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["-q", "renew", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["renew", str(out)]) == 0
    renewed = capsys.readouterr()
    assert renewed.err.count("wrote ") == int(renewed.out.split()[1]) == 3  # coordinator, operator, orchestrator


@pytest.mark.parametrize(
    "argv",
    [
        ["init", "{out}", "--crunch", "Bad Crunch"],
        ["init", "{out}", "--crunch", "c1", "--model", "M_1"],
        ["init", "{out}", "--crunch", "c1", "--days", "0"],
        ["init", "{out}"],  # --crunch missing
        ["frobnicate"],
        [],
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    out = tmp_path / "out"
    assert main([a.format(out=out) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secure-runner pki: error: ")
    assert "Traceback" not in captured.err
    assert not out.exists()
