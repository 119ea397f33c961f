"""End to end with the chain registry: parties provisioned apart, identities read from Solana accounts.

Each party runs its own `secure-runner pki <role>` commands in its own folder (only public
files travel, as in test_provisioning.py); the crunch's identities are planted as real
account bytes in LiteSVM behind a JSON-RPC server on loopback (test_registry_chain.py's
fixtures). The orchestrator, the runner process it starts and the coordinator's client all
select the chain source by configuration. A call succeeds over mutual TLS with tokens, to a
runner delegated with our form and to one delegated with the reference's wallet-signed
enrolment message (checked against the chain's wallet and hotkey for the model); then the chain changes under a live connection: a coordinator TLS key in
neither certificate slot is refused (SMP-5a), and a Rejected coordinator is refused
(KEY_REVOKED), each within the refresh bound.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import time
import types
from pathlib import Path

import grpc

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from solders.pubkey import Pubkey

from nacl.signing import SigningKey

from conftest import CRUNCH, MODELS, assert_refused, by_id, connected, json_args, orchestrating
from secure_runner import pki
from secure_runner.client.results import CallStatus
from secure_runner.client.security import CoordinatorSecurity
from secure_runner.errors import ErrorCode
from secure_runner.orchestrator.service import WATCH_RPC
from test_attacks import _orchestrator_channel, _orchestrator_token, _watch
from test_provisioning import pki_cli, send
from test_registry_chain import APPROVED, REJECTED, Chain, Crunch

MODEL_ID = "counter"  # delegated with our form
ENROLLED_MODEL_ID = "async-model"  # delegated with the reference's enrolment message
REFRESH_BOUND_SECONDS = 5.0  # the adapters refresh every second; the margin absorbs a loaded machine


def provision(root: Path) -> dict[str, Path]:
    """Operator (CA), coordinator, runner host and crunchers, each in its own folder; no registry file anywhere.

    bob enrolled with the reference's tooling: his wallet signs its enrolment message for his runner's key.
    """
    op, coord, host, alice, bob = (root / name for name in ("operator", "coordinator", "host", "alice", "bob"))
    pki_cli("ca", "init", "--dir", op, "--crunch", CRUNCH)
    pki_cli("coordinator", "init", "--dir", coord, "--crunch", CRUNCH, "--public-out", coord / "public.json")
    pki_cli("runner-host", "init", "--dir", host, "--crunch", CRUNCH, "--node", MODEL_ID, "--node", ENROLLED_MODEL_ID,
            "--orchestrator")
    pki_cli("cruncher", "init", "--dir", alice, "--id", "alice", "--public-out", alice / "public.json")

    key_id = json.loads(send(coord / "public.json", op / "inbox").read_text())["keys"][0]["key_id"]
    requests = {
        ("coordinator", key_id): send(coord / "coordinator" / "tls.csr", op / "inbox" / "coordinator"),
        ("orchestrator", "orchestrator"): send(host / "orchestrator" / "tls.csr", op / "inbox" / "orchestrator"),
        **{("runner", m): send(host / "runners" / m / "tls.csr", op / "inbox" / m) for m in (MODEL_ID, ENROLLED_MODEL_ID)},
    }
    for (role, ident), csr in requests.items():
        pki_cli("ca", "sign", "--dir", op, "--csr", csr, "--role", role, "--id", ident, "--out", op / "out" / f"{ident}.crt")
    pki_cli("coordinator", "install", "--dir", coord, "--cert", send(op / "out" / f"{key_id}.crt", coord / "inbox"),
            "--ca", send(op / "ca.crt", coord / "inbox"))
    pki_cli("runner-host", "install", "--dir", host,
            *(a for n in ("orchestrator", MODEL_ID, ENROLLED_MODEL_ID) for a in ("--cert", send(op / "out" / f"{n}.crt", host / "inbox"))),
            "--ca", send(op / "ca.crt", host / "inbox"))
    pki_cli("cruncher", "delegate", "--dir", alice, "--crunch", CRUNCH, "--model", MODEL_ID, "--runner-cert",
            send(host / "runners" / MODEL_ID / "tls.crt", alice / "inbox"), "--out", alice / "counter.delegation")
    pki_cli("runner-host", "add-delegation", "--dir", host, "--model", MODEL_ID,
            send(alice / "counter.delegation", host / "inbox"))
    enrolment = reference_enrolment(bob, send(host / "runners" / ENROLLED_MODEL_ID / "tls.crt", bob / "inbox"))
    pki_cli("runner-host", "add-delegation", "--dir", host, "--model", ENROLLED_MODEL_ID, send(enrolment, host / "inbox"))
    return {"coordinator": coord, "host": host, "alice": alice, "bob": bob}


def reference_enrolment(bob: Path, runner_cert: Path) -> Path:
    """What the reference's tooling writes: the wallet's signature over the UTF-8 JSON naming cert, hotkey, model."""
    wallet, hotkey = SigningKey.generate(), SigningKey.generate().verify_key
    (bob / "wallet.pub").write_bytes(bytes(wallet.verify_key))
    (bob / "hotkey.pub").write_bytes(bytes(hotkey))
    spki = pki.load_certificate(runner_cert).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    message = json.dumps({"cert_pub": base64.b64encode(spki).decode(), "hotkey": str(Pubkey.from_bytes(bytes(hotkey))),
                          "model_id": ENROLLED_MODEL_ID}).encode()
    envelope = {"message_b64": base64.b64encode(message).decode(),
                "wallet_pubkey_b58": str(Pubkey.from_bytes(bytes(wallet.verify_key))),
                "signature_b64": base64.b64encode(wallet.sign(message).signature).decode()}
    path = bob / f"{ENROLLED_MODEL_ID}.enrolment.json"
    path.write_text(json.dumps(envelope))
    return path


def plant(chain: Chain, parties: dict[str, Path]) -> Crunch:
    """The operator's on-chain registration of the provisioned public material."""
    alice = json.loads((parties["alice"] / "public.json").read_text())
    crunch = Crunch(chain, wallet=base64.b64decode(alice["public_key"]))
    coordinator = json.loads((parties["coordinator"] / "public.json").read_text())["keys"][0]
    crunch.owner, crunch.key_id = base64.b64decode(coordinator["public_key"]), coordinator["key_id"]
    certificate = pki.load_certificate(pki.PkiLayout(parties["coordinator"]).coordinator_cert)
    crunch.coordinator_tls = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    crunch.set_coordinator(APPROVED)
    enrol_only(crunch, crunch.coordinator_tls)
    crunch.add_model(MODEL_ID, crunch.wallet)
    bob_wallet = (parties["bob"] / "wallet.pub").read_bytes()
    crunch.add_cruncher(bob_wallet, (parties["bob"] / "hotkey.pub").read_bytes())
    crunch.add_model(ENROLLED_MODEL_ID, bob_wallet)
    return crunch


def enrol_only(crunch: Crunch, spki_der: bytes) -> None:
    crunch.set_certificate(hashlib.sha256(spki_der).digest(), bytes(32), int(time.time()), 0)


async def call_until(client, reason: str) -> None:
    """Call until the result's reason is `reason` ("" for a success); fail past the refresh bound."""
    deadline = time.monotonic() + REFRESH_BOUND_SECONDS
    while True:
        result = by_id(await client.call("echo", json_args({"price": 2.0})))[MODEL_ID]
        if result.reason == reason and (result.status is CallStatus.SUCCESS) == (reason == ""):
            return
        assert time.monotonic() < deadline, f"still {result.status} {result.reason} {result.message}"


async def test_parties_apart_call_models_through_the_chain_registry_and_refusals_reach_live_connections(tmp_path):
    parties = provision(tmp_path / "parties")
    chain = Chain()
    try:
        crunch = plant(chain, parties)
        config = {name: parties[name] / "chain.json" for name in ("coordinator", "host")}
        for path in config.values():  # each party's own copy of the public configuration
            path.write_text(crunch.config(crunch_id=CRUNCH).model_dump_json())
        host = pki.PkiLayout(parties["host"])
        assert not host.registry.exists() and not pki.PkiLayout(parties["coordinator"]).registry.exists()
        security = dataclasses.replace(
            CoordinatorSecurity.from_pki_dir(parties["coordinator"]), chain_config=config["coordinator"])
        models = {m: MODELS / "submissions" / m for m in (MODEL_ID, ENROLLED_MODEL_ID)}
        async with orchestrating(host, tmp_path, models, credentials_mode="production", models_per_node=1,
                                 chain_config=config["host"]) as orchestrator:
            async with connected(pki.PkiLayout(parties["coordinator"]), orchestrator.port, security=security) as client:
                assert await client.ready(10)
                results = by_id(await client.call("echo", json_args({"price": 1.5})))
                assert results[MODEL_ID].status is CallStatus.SUCCESS and results[MODEL_ID].output == {"price": 1.5}
                assert results[MODEL_ID].model.cruncher_id == str(Pubkey.from_bytes(crunch.wallet))  # the chain's word
                assert results[ENROLLED_MODEL_ID].status is CallStatus.SUCCESS, results[ENROLLED_MODEL_ID]
                assert results[ENROLLED_MODEL_ID].output == {"echoed": {"price": 1.5}}

                # The coordinator's certificate slots now hold another TLS key only: its live channel is refused,
                # and so is its open model-list stream (SMP-20 re-checks SMP-5a).
                seen_by_coordinator = types.SimpleNamespace(  # its own files and the orchestrator's public certificate
                    **{name: getattr(pki.PkiLayout(parties["coordinator"]), name)
                       for name in ("coordinator_identity", "coordinator_cert", "coordinator_key", "ca_cert")},
                    orchestrator_cert=host.orchestrator_cert)
                async with _orchestrator_channel(seen_by_coordinator, orchestrator.port) as channel:
                    stream = _watch(channel, _orchestrator_token(seen_by_coordinator, CRUNCH, WATCH_RPC))
                    assert {m.model_id for m in (await stream.read()).models} == set(models)
                    enrol_only(crunch, b"another SubjectPublicKeyInfo")
                    await call_until(client, ErrorCode.COORDINATOR_CERT_NOT_ENROLLED)
                    await assert_refused(  # within the re-authorization interval (1 s) once the registry shows it
                        asyncio.wait_for(stream.read(), 5), grpc.StatusCode.UNAUTHENTICATED,
                        ErrorCode.COORDINATOR_CERT_NOT_ENROLLED)
                enrol_only(crunch, crunch.coordinator_tls)
                await call_until(client, "")  # enrolled again: served again

                crunch.set_coordinator(REJECTED)  # the operator rejects the coordinator on chain
                await call_until(client, ErrorCode.KEY_REVOKED)
    finally:
        chain.stop()
