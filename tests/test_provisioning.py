"""Provisioning per party: each party runs its own `secure-runner pki <role>` commands in its own folder.

Only public files travel between the folders (`send` copies one and refuses anything
holding a private key). The CA signs from CSRs under its policy; the issued certificates
pass real path validation; crunchers sign delegations (one with a Solana wallet file);
the registry is built from public files; then an orchestrator in production mode, which
holds no CA key and no cruncher key, and the coordinator provisioned this way call
models over mTLS with signed tokens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from conftest import CRUNCH, MODELS, by_id, connected, json_args, orchestrating
from secure_runner import pki
from secure_runner.client.results import CallStatus
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.orchestrator.credentials import ProvisionedCredentials
from secure_runner.orchestrator.launcher import LauncherError
from secure_runner.provisioning import ca, certs, coordinator, cruncher
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.registry import Registry, RegistrySnapshot
from secure_runner.smp.rules import verify_delegation
from secure_runner.v1 import orchestrator_pb2

MODEL_IDS = ("counter", "async-model")


def pki_cli(*args: object) -> str:
    """One `secure-runner pki ...` command in its own process; its stdout (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "secure_runner.cli", "pki", *map(str, args)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def send(path: Path, to: Path) -> Path:
    """Hand one file to another party: only public material may travel."""
    assert b"PRIVATE KEY" not in path.read_bytes(), f"{path} holds a private key"
    to.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, to / path.name))


def solana_keypair_file(path: Path) -> Ed25519PrivateKey:
    """A wallet file as `solana-keygen` writes it: JSON array of seed (32 bytes) then public key (32 bytes)."""
    key = Ed25519PrivateKey.generate()
    path.write_text(json.dumps(list(key.private_bytes_raw() + pki.public_key_raw(key))))
    return key


@pytest.fixture(scope="module")
def parties(tmp_path_factory) -> dict[str, Path]:
    """Every party provisioned by its own commands, in its own folder."""
    root = tmp_path_factory.mktemp("parties")
    op, coord, host, alice, bob = (root / name for name in ("operator", "coordinator", "host", "alice", "bob"))

    pki_cli("ca", "init", "--dir", op, "--crunch", CRUNCH)
    pki_cli("coordinator", "init", "--dir", coord, "--crunch", CRUNCH, "--public-out", coord / "public.json")
    pki_cli("runner-host", "init", "--dir", host, "--crunch", CRUNCH, "--node", MODEL_IDS[0], "--node", MODEL_IDS[1],
            "--orchestrator")
    pki_cli("cruncher", "init", "--dir", alice, "--id", "alice", "--public-out", alice / "public.json")
    bob.mkdir()
    solana_keypair_file(bob / "wallet.json")
    pki_cli("cruncher", "public", "--wallet", bob / "wallet.json", "--id", "bob", "--public-out", bob / "public.json")

    # The operator receives CSRs and public files, approves each identity, and builds the registry.
    inbox = op / "inbox"
    key_id = json.loads(send(coord / "public.json", inbox).read_text())["keys"][0]["key_id"]
    requests = {
        ("coordinator", key_id): send(coord / "coordinator" / "tls.csr", inbox / "coordinator"),
        ("orchestrator", "orchestrator"): send(host / "orchestrator" / "tls.csr", inbox / "orchestrator"),
        **{("runner", m): send(host / "runners" / m / "tls.csr", inbox / m) for m in MODEL_IDS},
    }
    for (role, ident), csr in requests.items():
        pki_cli("ca", "sign", "--dir", op, "--csr", csr, "--role", role, "--id", ident, "--out", op / "out" / f"{ident}.crt")
    pki_cli("registry", "build", "--crunch", CRUNCH, "--signer", inbox / "public.json",
            "--cruncher", send(alice / "public.json", inbox / "alice"), "--cruncher", send(bob / "public.json", inbox / "bob"),
            "--model", f"{MODEL_IDS[0]}:Counter:alice:Alice", "--model", f"{MODEL_IDS[1]}:Async:bob:Bob",
            "--out", op / "out" / "registry.json")

    # Certificates, the CA certificate and the registry go back; each party checks and installs its own.
    back = {name: send(op / "out" / name, coord / "inbox") for name in (f"{key_id}.crt", "registry.json")}
    ca_cert = send(op / "ca.crt", coord / "inbox")
    pki_cli("coordinator", "install", "--dir", coord, "--cert", back[f"{key_id}.crt"], "--ca", ca_cert,
            "--registry", back["registry.json"])
    host_certs = [send(op / "out" / f"{n}.crt", host / "inbox") for n in ("orchestrator", *MODEL_IDS)]
    pki_cli("runner-host", "install", "--dir", host, *(a for c in host_certs for a in ("--cert", c)),
            "--ca", send(op / "ca.crt", host / "inbox"), "--registry", send(op / "out" / "registry.json", host / "inbox"))

    # Each cruncher vouches for its runner's key: alice from the certificate, bob (wallet) from the CSR.
    pki_cli("cruncher", "delegate", "--dir", alice, "--crunch", CRUNCH, "--model", MODEL_IDS[0], "--runner-cert",
            send(host / "runners" / MODEL_IDS[0] / "tls.crt", alice / "inbox"), "--out", alice / "counter.delegation")
    pki_cli("cruncher", "delegate", "--wallet", bob / "wallet.json", "--crunch", CRUNCH, "--model", MODEL_IDS[1],
            "--runner-csr", send(host / "runners" / MODEL_IDS[1] / "tls.csr", bob / "inbox"),
            "--out", bob / "async-model.delegation")
    for model_id, token in ((MODEL_IDS[0], alice / "counter.delegation"), (MODEL_IDS[1], bob / "async-model.delegation")):
        pki_cli("runner-host", "add-delegation", "--dir", host, "--model", model_id, send(token, host / "inbox"))
    return {"operator": op, "coordinator": coord, "host": host, "alice": alice, "bob": bob}


def _private_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}


def test_each_party_holds_only_its_own_keys(parties) -> None:
    assert _private_files(parties["operator"]) == {"ca.key"}
    assert _private_files(parties["coordinator"]) == {"coordinator/identity.key", "coordinator/tls.key"}
    assert _private_files(parties["host"]) == {"orchestrator/tls.key", *(f"runners/{m}/tls.key" for m in MODEL_IDS)}
    assert _private_files(parties["alice"]) == {"identity.key"}
    assert _private_files(parties["bob"]) == set()  # its wallet file, never copied anywhere
    logged = [entry["spiffe_id"] for entry in ca.CaFolder(parties["operator"]).issued()]
    assert sorted(logged) == sorted(certs.identity_of(pki.load_certificate(p)).spiffe_id
                                    for p in (parties["operator"] / "out").glob("*.crt"))
    assert "spiffe://" in pki_cli("ca", "list", "--dir", parties["operator"])
    # What a coordinator prints to register is public: key id, public key, certificate hash; never its keys.
    printed = pki_cli("coordinator", "public", "--dir", parties["coordinator"])
    home = coordinator.SignerHome(parties["coordinator"])
    assert home.current.key_id() in printed and home.current.public().cert_hash in printed
    seed = pki.load_identity_key(home.current.identity_key).private_bytes_raw()
    assert "PRIVATE" not in printed and pki.b64(seed) not in printed and seed.hex() not in printed


def test_issued_certificates_pass_path_validation_for_their_role(parties) -> None:
    ca_cert = pki.load_certificate(parties["operator"] / "ca.crt")
    coordinator_cert = pki.load_certificate(parties["coordinator"] / "coordinator" / "tls.crt")
    key_id = coordinator.SignerHome(parties["coordinator"]).current.key_id()
    certs.verify_leaf(coordinator_cert, ca_cert, PeerIdentity.make(CRUNCH, Role.COORDINATOR, key_id))
    runner_cert = pki.load_certificate(parties["host"] / "runners" / "counter" / "tls.crt")
    certs.verify_leaf(runner_cert, ca_cert, PeerIdentity.make(CRUNCH, Role.RUNNER, "counter"))
    # The SAN is checked: the same certificate is not valid for another runner, nor a client-only role as a server.
    with pytest.raises(ConfigError) as refused:
        certs.verify_leaf(runner_cert, ca_cert, PeerIdentity.make(CRUNCH, Role.RUNNER, "async-model"))
    assert refused.value.code is ErrorCode.CERT_NOT_ISSUED_FOR_US
    with pytest.raises(ConfigError):
        certs.verify_leaf(coordinator_cert, ca_cert, PeerIdentity.make(CRUNCH, Role.RUNNER, key_id))


def _csr(identity: PeerIdentity, key=None, *, extra_uri: str | None = None, extra_dns: str | None = None):
    key = key or certs.generate_tls_key()
    sans = [x509.UniformResourceIdentifier(identity.spiffe_id), x509.DNSName(identity.tls_server_name)]
    sans += [x509.UniformResourceIdentifier(extra_uri)] if extra_uri else []
    sans += [x509.DNSName(extra_dns)] if extra_dns else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(
        x509.SubjectAlternativeName(sans), critical=False
    )
    return builder.sign(key, None if isinstance(key, Ed25519PrivateKey) else hashes.SHA256()).public_bytes(Encoding.PEM)


RUNNER_M1 = PeerIdentity.make(CRUNCH, Role.RUNNER, "m1")


@pytest.mark.parametrize(
    ("csr", "days", "code"),
    [
        (lambda: _csr(PeerIdentity.make(CRUNCH, Role.ORCHESTRATOR, "m1")), 7, ErrorCode.CSR_IDENTITY_REFUSED),
        (lambda: _csr(PeerIdentity.make(CRUNCH, Role.RUNNER, "m2")), 7, ErrorCode.CSR_IDENTITY_REFUSED),
        (lambda: _csr(PeerIdentity.make("other-crunch", Role.RUNNER, "m1")), 7, ErrorCode.CSR_IDENTITY_REFUSED),
        (lambda: _csr(RUNNER_M1, extra_uri="spiffe://test-crunch/coordinator/k1"), 7, ErrorCode.CSR_IDENTITY_REFUSED),
        (lambda: _csr(RUNNER_M1, extra_dns="m2.runner.test-crunch.invalid"), 7, ErrorCode.CSR_IDENTITY_REFUSED),
        (lambda: _csr(RUNNER_M1, ec.generate_private_key(ec.SECP384R1())), 7, ErrorCode.CSR_KEY_REFUSED),
        (lambda: _csr(RUNNER_M1, Ed25519PrivateKey.generate()), 7, ErrorCode.CSR_KEY_REFUSED),
        (lambda: _csr(RUNNER_M1), ca.MAX_LEAF_DAYS + 1, ErrorCode.CSR_VALIDITY_REFUSED),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", 7,
         ErrorCode.CSR_INVALID),
    ],
    ids=["other-role", "other-id", "other-crunch", "two-uri-sans", "foreign-dns-san", "p384-key", "ed25519-key",
         "too-long", "not-a-csr"],
)
def test_the_ca_refuses_what_the_operator_did_not_approve(parties, tmp_path, csr, days, code) -> None:
    authority = ca.CaFolder(shutil.copytree(parties["operator"], tmp_path / "op"))
    before = len(authority.issued())
    with pytest.raises(ConfigError) as refused:
        authority.sign(csr(), Role.RUNNER, "m1", days)  # the approval: runner m1 of the CA's crunch
    assert refused.value.code is code
    assert len(authority.issued()) == before  # nothing signed


def test_the_ca_names_the_certificate_from_the_approval_and_refuses_on_the_command_line(parties, tmp_path) -> None:
    authority = ca.CaFolder(shutil.copytree(parties["operator"], tmp_path / "op"))
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "admin")])
    ).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(RUNNER_M1.spiffe_id)]), critical=False
    ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(
        certs.generate_tls_key(), hashes.SHA256()
    )  # fmt: skip
    cert = authority.sign(csr.public_bytes(Encoding.PEM), Role.RUNNER, "m1", 2)
    certs.verify_leaf(cert, pki.load_certificate(authority.cert), RUNNER_M1)  # a leaf (no CA bit), both SANs
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "m1"

    (tmp_path / "bad.csr").write_bytes(_csr(RUNNER_M1, ec.generate_private_key(ec.SECP384R1())))
    done = subprocess.run(
        [sys.executable, "-m", "secure_runner.cli", "pki", "ca", "sign", "--dir", authority.root, "--csr",
         tmp_path / "bad.csr", "--role", "runner", "--id", "m1", "--out", tmp_path / "m1.crt"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("secure-runner pki: error: CSR_KEY_REFUSED")
    assert "Traceback" not in done.stderr and not (tmp_path / "m1.crt").exists()


def test_each_pki_command_lists_what_it_wrote_on_stderr_unless_quiet(parties, tmp_path) -> None:
    """A party's commands keep stdout for what they print to be sent on; stderr names each file written."""
    def run(*args: object) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "secure_runner.cli", "pki", *map(str, args)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done

    home = tmp_path / "coord"
    done = run("coordinator", "init", "--dir", home, "--crunch", CRUNCH, "--public-out", home / "public.json")
    assert done.stdout.startswith("{") and "wrote " not in done.stdout  # stdout: what it printed before
    key_id = json.loads((home / "public.json").read_text())["keys"][0]["key_id"]
    assert done.stderr.splitlines() == [
        f"wrote {home / 'coordinator' / 'identity.key'}: Ed25519 private key, mode 0600",
        f"wrote {home / 'coordinator' / 'tls.key'}: ECDSA P-256 private key, mode 0600",
        f"wrote {home / 'coordinator' / 'tls.csr'}: certificate signing request",
        f"wrote {home / 'public.json'}: public material to register (JSON)",
    ]
    authority = shutil.copytree(parties["operator"], tmp_path / "op")
    out = tmp_path / "coordinator.crt"
    done = run("ca", "sign", "--dir", authority, "--csr", home / "coordinator" / "tls.csr", "--role", "coordinator",
               "--id", key_id, "--out", out)
    cert = pki.load_certificate(out)
    serial = format(cert.serial_number, "x")
    assert done.stderr.splitlines() == [
        f"wrote {authority / 'issued.jsonl'}: issuance log, one line appended (sign serial {serial})",
        f"wrote {out}: certificate, subject {cert.subject.rfc4514_string()}, {certs.uri_sans(cert)[0]}, "
        f"expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
    ]
    quiet = run("ca", "sign", "--quiet", "--dir", authority, "--csr", home / "coordinator" / "tls.csr", "--role",
                "coordinator", "--id", key_id, "--out", out)
    assert quiet.stderr == "" and quiet.stdout.startswith("issued ")


def test_renewal_keeps_the_identity_and_key_or_takes_a_new_csr_for_it(parties, tmp_path) -> None:
    authority = ca.CaFolder(shutil.copytree(parties["operator"], tmp_path / "op"))
    old = pki.load_certificate(parties["host"] / "runners" / "counter" / "tls.crt")
    pki_cli("ca", "renew", "--dir", authority.root, "--cert", old_path := send(
        parties["host"] / "runners" / "counter" / "tls.crt", tmp_path / "in"), "--days", "3", "--out", tmp_path / "r.crt")
    renewed = pki.load_certificate(tmp_path / "r.crt")
    identity = PeerIdentity.make(CRUNCH, Role.RUNNER, "counter")
    certs.verify_leaf(renewed, pki.load_certificate(authority.cert), identity, key=old.public_key())
    assert renewed.serial_number != old.serial_number
    # A new key for the same identity goes through the CSR policy: a CSR for another identity is refused.
    with pytest.raises(ConfigError) as refused:
        authority.renew(pki.load_certificate(old_path), 3, _csr(PeerIdentity.make(CRUNCH, Role.RUNNER, "async-model")))
    assert refused.value.code is ErrorCode.CSR_IDENTITY_REFUSED
    new_key = certs.generate_tls_key()
    fresh = authority.renew(old, 3, _csr(identity, new_key))
    certs.verify_leaf(fresh, pki.load_certificate(authority.cert), identity, key=new_key)


def test_a_coordinator_rotates_with_both_keys_registered_during_the_overlap(parties, tmp_path) -> None:
    home = coordinator.SignerHome(shutil.copytree(parties["coordinator"], tmp_path / "coord"))
    authority = ca.CaFolder(shutil.copytree(parties["operator"], tmp_path / "op"))
    old_id = home.current.key_id()
    during = home.rotate(CRUNCH)
    new_id = home.next.key_id()
    assert [k.key_id for k in during.keys] == [old_id, new_id]
    # Only a certificate for one of its own keys, from its CA, is installed.
    with pytest.raises(ConfigError) as refused:
        home.install(pki.load_certificate(parties["host"] / "runners" / "counter" / "tls.crt"),
                     pki.load_certificate(authority.cert))
    assert refused.value.code is ErrorCode.CERT_NOT_ISSUED_FOR_US
    home.install(authority.sign(home.next.tls_csr.read_bytes(), Role.COORDINATOR, new_id, 7),
                 pki.load_certificate(authority.cert))
    assert home.current.key_id() == new_id and home.previous.key_id() == old_id and not home.next.folder.exists()
    assert [k.key_id for k in home.public().keys] == [new_id, old_id]


def test_a_solana_wallet_file_must_hold_a_matching_pair(tmp_path) -> None:
    key = solana_keypair_file(tmp_path / "ok.json")
    assert pki.public_key_raw(cruncher.load_solana_keypair(tmp_path / "ok.json")) == pki.public_key_raw(key)
    values = json.loads((tmp_path / "ok.json").read_text())
    (tmp_path / "mismatch.json").write_text(json.dumps(values[:32] + [(values[32] + 1) % 256] + values[33:]))
    (tmp_path / "short.json").write_text(json.dumps(values[:63]))
    for name in ("mismatch.json", "short.json"):
        with pytest.raises(ConfigError) as refused:
            cruncher.load_solana_keypair(tmp_path / name)
        assert refused.value.code is ErrorCode.PKI_INVALID


def test_delegations_verify_under_the_built_registry(parties) -> None:
    host = pki.PkiLayout(parties["host"])
    snapshot = RegistrySnapshot(Registry.from_json(host.registry.read_bytes()), fetched_at=int(time.time()))
    for model_id in MODEL_IDS:
        claims = verify_delegation(
            (host.root / "delegations" / f"{model_id}.delegation").read_bytes(), registry=snapshot, crunch_id=CRUNCH,
            model_id=model_id, presented_spki_sha256=certs.spki_sha256_b64url(
                pki.load_certificate(host.runner_cert(model_id)).public_key()), now=int(time.time()),
        )  # fmt: skip
        assert claims.model == model_id


def test_production_mode_refuses_a_test_pki_and_unusable_files(parties, tmp_path) -> None:
    test_pki = pki.make_test_pki(tmp_path / "pki", CRUNCH, [pki.ModelSpec("counter")])
    with pytest.raises(ConfigError) as refused:
        ProvisionedCredentials(test_pki, CRUNCH, lambda: None)
    assert refused.value.code is ErrorCode.PKI_INVALID and "ca.key" in refused.value.message

    host = pki.PkiLayout(shutil.copytree(parties["host"], tmp_path / "host"))
    snapshot = RegistrySnapshot(Registry.from_json(host.registry.read_bytes()), fetched_at=int(time.time()))
    credentials = ProvisionedCredentials(host, CRUNCH, lambda: snapshot)
    with pytest.raises(LauncherError, match="no usable runner certificate"):
        credentials.issue("unprovisioned-node")
    cert = credentials.issue("async-model")
    # alice's delegation (for counter) put in place of bob's: refused before any runner starts.
    shutil.copy(host.root / "delegations" / "counter.delegation", host.root / "delegations" / "async-model.delegation")
    info = orchestrator_pb2.ModelInfo(model_id="async-model")
    with pytest.raises(LauncherError, match="DELEGATION_BAD_SIGNATURE"):
        credentials.delegation(info, cert)


async def test_a_production_orchestrator_and_a_provisioned_coordinator_call_models(parties, tmp_path) -> None:
    """End to end: no party's secret in another's folder; full mTLS, tokens and delegations."""
    models = {m: MODELS / "submissions" / m for m in MODEL_IDS}
    host, coordinator_home = pki.PkiLayout(parties["host"]), pki.PkiLayout(parties["coordinator"])
    async with orchestrating(host, tmp_path, models, credentials_mode="production", models_per_node=1) as orchestrator:
        assert not host.ca_key.exists() and not host.crunchers_dir.exists()
        async with connected(coordinator_home, orchestrator.port) as client:
            assert await client.ready(10)
            results = by_id(await client.call("echo", json_args({"price": 1.5})))
    assert set(results) == set(MODEL_IDS)
    assert results["counter"].status is CallStatus.SUCCESS and results["counter"].output == {"price": 1.5}
    assert (results["counter"].cruncher_id, results["async-model"].cruncher_name) == ("alice", "Bob")
    assert results["async-model"].output == {"echoed": {"price": 1.5}}
