"""The chain registry adapter against a real Solana runtime, and the reference enrolment.

Accounts are planted as real bytes in LiteSVM (solders' in-process Solana VM) and served
by a small JSON-RPC server on loopback that reads them from the VM, so the adapter's HTTP
path, its decoding and its checks run for real. Signatures are real Ed25519 (PyNaCl), and
the reference enrolment vectors are real signed files (tests/vectors/reference_enrolment/).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from solders.account import Account
from solders.litesvm import LiteSVM
from solders.pubkey import Pubkey

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from secure_runner.errors import AuthError, ConfigError, ErrorCode
from secure_runner.registry.chain import ChainRegistry, ChainRegistryConfig
from secure_runner.registry.enrolment import verify_reference_enrolment
from secure_runner.registry.solana_accounts import (
    ChainAccountsConfig,
    RawAccount,
    decode_certificate,
    decode_coordinator,
    decode_cruncher,
    decode_model,
)
from secure_runner.smp import rules
from secure_runner.smp.registry import RegistrySnapshot, key_id_for
from secure_runner.smp.token import issue_delegation, sha256_b64url
from secure_runner.transport.registry_file import REGISTRY_HEALTH_SERVICE, watch_registry

HealthServicer = health_aio.HealthServicer

VECTORS = Path(__file__).resolve().parent / "vectors" / "reference_enrolment"
CRUNCH = "chain-crunch"
MODEL = "13367"
PENDING, APPROVED, REJECTED = 0, 1, 2


def _program() -> str:
    return str(Pubkey.new_unique())


def _tag(name: str) -> bytes:
    return hashlib.sha256(f"account:{name}".encode()).digest()[:8]


ACCOUNTS = ChainAccountsConfig.model_validate({
    "coordinator": {"program_id": _program(), "discriminator": _tag("Coordinator").hex()},
    "certificate": {"program_id": _program(), "discriminator": _tag("CoordinatorCertificate").hex(),
                    "seeds": ["coordinator_certificate", "{key}"]},
    "cruncher": {"program_id": _program(), "discriminator": _tag("Cruncher").hex(), "seeds": ["cruncher", "{key}"]},
    "model": {"program_id": _program(), "discriminator": _tag("Model").hex()},
})


def borsh(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<I", len(raw)) + raw


def spki_der_of_new_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


# -- the chain: LiteSVM behind a JSON-RPC server on loopback ---------------------------------

class LoopbackServer(ThreadingHTTPServer):
    def server_bind(self) -> None:
        """As HTTPServer's, without its reverse DNS lookup of the address (slow on some hosts)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class Chain:
    """LiteSVM accounts served over HTTP JSON-RPC; `mode` makes the server misbehave on purpose."""

    def __init__(self) -> None:
        self.svm = LiteSVM()
        self.mode = "ok"
        self.calls: list[tuple[str, dict]] = []  # (method, its options) of every request
        chain = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["content-length"])))
                status, body, headers = chain.answer(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = LoopbackServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def put(self, address: bytes | Pubkey, owner: str | Pubkey, data: bytes) -> None:
        self.svm.set_account(Pubkey.from_bytes(bytes(address)), Account(
            lamports=1_000_000, data=data, owner=Pubkey.from_string(str(owner)), executable=False))

    def answer(self, request: dict) -> tuple[int, bytes, dict[str, str]]:
        method, params = request["method"], request["params"]
        self.calls.append((method, params[-1]))
        reply: dict = {"jsonrpc": "2.0", "id": request["id"]}
        if self.mode == "rate_limited":
            return 429, b"Too Many Requests", {"retry-after": "1"}
        if self.mode == "http_error":
            return 503, b"unavailable", {}
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "garbage":
            return 200, b"<html>not json</html>", {}
        if self.mode == "oversized":
            return 200, b" " * 4096 + b"{}", {}
        if self.mode == "jsonrpc_error":
            reply["error"] = {"code": -32005, "message": "Node is behind by 42 slots"}
        elif self.mode == "wrong_shape":
            reply["result"] = {"context": {"slot": 1}, "value": "nope"}
        else:
            assert params[1]["commitment"] == "finalized" and params[1]["encoding"] == "base64"
            reply["result"] = getattr(self, method)(*params)
        return 200, json.dumps(reply).encode(), {"content-type": "application/json"}

    def _context(self) -> dict:
        return {"slot": self.svm.get_clock().slot}

    @staticmethod
    def _account_json(account: Account) -> dict:
        data = bytes(account.data)
        return {"data": [base64.b64encode(data).decode(), "base64"], "owner": str(account.owner),
                "lamports": account.lamports, "executable": account.executable, "rentEpoch": 0, "space": len(data)}

    def _lookup(self, address: str) -> dict | None:
        account = self.svm.get_account(Pubkey.from_string(address))
        return self._account_json(account) if account is not None and account.lamports > 0 else None

    def getMultipleAccounts(self, addresses: list[str], options: dict) -> dict:  # noqa: N802 (the RPC's name)
        return {"context": self._context(), "value": [self._lookup(a) for a in addresses]}

    def getProgramAccounts(self, program: str, options: dict) -> dict:  # noqa: N802
        def matches(data: bytes) -> bool:
            for memcmp in (f["memcmp"] for f in options["filters"]):
                assert memcmp["encoding"] == "base64"
                want = base64.b64decode(memcmp["bytes"])
                if data[memcmp["offset"]:memcmp["offset"] + len(want)] != want:
                    return False
            return True

        found = [{"pubkey": str(address), "account": self._account_json(account)}
                 for address, account in self.svm.get_program_accounts(Pubkey.from_string(program))
                 if matches(bytes(account.data))]
        return {"context": self._context(), "value": found} if options.get("withContext") else found


class Crunch:
    """One crunch planted on the chain: a coordinator with its certificate, a cruncher and its model.

    The cruncher is a fresh wallet, or the given one (a reference vector's, whose key we do not hold).
    """

    def __init__(self, chain: Chain, wallet: bytes | None = None, hotkey: bytes | None = None) -> None:
        self.chain = chain
        self.address = bytes(Pubkey.new_unique())
        self.coordinator_account = bytes(Pubkey.new_unique())
        self.owner = bytes(SigningKey.generate().verify_key)  # the coordinator's wallet
        self.key_id = key_id_for(self.owner)
        self.coordinator_tls = spki_der_of_new_key()
        self.set_coordinator(APPROVED)
        self.set_certificate(hashlib.sha256(self.coordinator_tls).digest(), bytes(32), 100, 0)
        self.wallet_key = SigningKey.generate()
        self.wallet = wallet or bytes(self.wallet_key.verify_key)
        self.hotkey = hotkey or bytes(SigningKey.generate().verify_key)
        self.add_cruncher(self.wallet, self.hotkey)
        self.add_model(MODEL, self.wallet)

    def set_coordinator(self, state: int, *, owner: bytes | None = None, data: bytes | None = None,
                        program: str | None = None) -> None:
        data = data if data is not None else (
            ACCOUNTS.coordinator.tag + (owner or self.owner) + bytes([state]) + borsh("Coordinator One"))
        self.chain.put(self.coordinator_account, program or ACCOUNTS.coordinator.program_id, data)

    def certificate_bytes(self, primary: bytes, secondary: bytes, primary_at: int, secondary_at: int) -> bytes:
        return struct.pack("<8s32s32s32sqqB", ACCOUNTS.certificate.tag, self.owner, primary, secondary,
                           primary_at, secondary_at, 254)

    def set_certificate(self, primary: bytes, secondary: bytes, primary_at: int, secondary_at: int, *,
                        data: bytes | None = None, program: str | None = None) -> None:
        data = data if data is not None else self.certificate_bytes(primary, secondary, primary_at, secondary_at)
        self.chain.put(ACCOUNTS.certificate.address_for(self.owner), program or ACCOUNTS.certificate.program_id, data)

    def add_cruncher(self, wallet: bytes, hotkey: bytes) -> None:
        self.chain.put(ACCOUNTS.cruncher.address_for(wallet), ACCOUNTS.cruncher.program_id,
                       ACCOUNTS.cruncher.tag + wallet + hotkey)

    def add_model(self, model_id: str, wallet: bytes, *, tail: bytes = b"") -> bytes:
        address = bytes(Pubkey.new_unique())
        self.chain.put(address, ACCOUNTS.model.program_id,
                       ACCOUNTS.model.tag + self.address + wallet + borsh(model_id) + borsh("My Model") + tail)
        return address

    def config(self, **overrides: object) -> ChainRegistryConfig:
        return ChainRegistryConfig.model_validate({
            "rpc_url": self.chain.url, "crunch_id": CRUNCH, "crunch_address": str(Pubkey.from_bytes(self.address)),
            "coordinators": [str(Pubkey.from_bytes(self.coordinator_account))],
            "accounts": ACCOUNTS.model_dump(), **overrides,
        })


@pytest.fixture
def chain() -> Iterator[Chain]:
    chain = Chain()
    yield chain
    chain.stop()


@pytest.fixture
def crunch(chain: Chain) -> Crunch:
    return Crunch(chain)


@pytest.fixture
def source(crunch: Crunch) -> Iterator[ChainRegistry]:
    source = ChainRegistry(crunch.config())
    yield source
    source.close()


def now() -> int:
    return int(time.time())


def coordinator_key(source: ChainRegistry, crunch: Crunch):
    return rules.current_registry(source.current(), now(), rules.TimePolicy()).coordinator_key(
        CRUNCH, crunch.key_id, datetime.fromtimestamp(now(), UTC))


def refused_codes(source: ChainRegistry) -> set[ErrorCode]:
    return {exc.code for exc in source.facts().refused}


def verify_runner(source: ChainRegistry, wallet_key: SigningKey, model_id: str = MODEL) -> None:
    """A real delegation signed by `wallet_key`, checked by the client's rule against the chain's registry."""
    runner_tls = sha256_b64url(spki_der_of_new_key())
    token = issue_delegation(wallet_key, crunch_id=CRUNCH, model_id=model_id, spki_sha256=runner_tls,
                             now=now(), lifetime=600)
    rules.verify_delegation(token, registry=source.current(), crunch_id=CRUNCH, model_id=model_id,
                            presented_spki_sha256=runner_tls, now=now())


# -- CH-1..CH-3: what the chain authorizes ---------------------------------------------------

def test_valid_accounts_authorize_the_coordinator_its_tls_key_and_the_cruncher(chain, crunch, source):
    key = coordinator_key(source, crunch)
    assert key.public_key_bytes == crunch.owner and not key.revoked
    rules.check_enrolled_tls_key(coordinator_key(source, crunch), hashlib.sha256(crunch.coordinator_tls).digest())
    verify_runner(source, crunch.wallet_key)
    assert source.current().registry.model(CRUNCH, MODEL).cruncher_id == str(Pubkey.from_bytes(crunch.wallet))
    assert source.facts().hotkeys == {crunch.wallet: crunch.hotkey}
    assert source.facts().refused == () and source.healthy
    first, *later = chain.calls[-4:]  # one refresh: coordinators, certificates, models, crunchers
    assert [method for method, _ in chain.calls[-4:]] == [
        "getMultipleAccounts", "getMultipleAccounts", "getProgramAccounts", "getMultipleAccounts"]
    assert all(options["minContextSlot"] == chain.svm.get_clock().slot for _, options in later)


def test_more_than_a_hundred_crunchers_are_read_in_batches(chain, crunch, source):
    wallets = [bytes(SigningKey.generate().verify_key) for _ in range(120)]
    for number, wallet in enumerate(wallets):
        crunch.add_cruncher(wallet, bytes(32))
        crunch.add_model(f"model-{number}", wallet)
    source.refresh()
    assert len(source.current().registry.crunches[CRUNCH].models) == 121 and source.facts().refused == ()
    assert [method for method, _ in chain.calls[-2:]] == ["getMultipleAccounts"] * 2  # 100 + 21 cruncher accounts


def test_another_tls_key_or_another_signer_is_refused(crunch, source):
    with pytest.raises(AuthError) as refused:
        rules.check_enrolled_tls_key(coordinator_key(source, crunch), hashlib.sha256(spki_der_of_new_key()).digest())
    assert refused.value.code is ErrorCode.COORDINATOR_CERT_NOT_ENROLLED
    with pytest.raises(AuthError) as refused:
        verify_runner(source, SigningKey.generate())
    assert refused.value.code is ErrorCode.DELEGATION_BAD_SIGNATURE


@pytest.mark.parametrize(("state", "code"), [(PENDING, ErrorCode.KEY_UNKNOWN), (REJECTED, ErrorCode.KEY_REVOKED)])
def test_only_an_approved_coordinator_may_sign(crunch, source, state, code):
    crunch.set_coordinator(state)
    source.refresh()
    with pytest.raises(AuthError) as refused:
        coordinator_key(source, crunch)
    assert refused.value.code is code


def test_an_owner_that_cannot_sign_is_refused(crunch, source):
    off_curve, _ = Pubkey.find_program_address([b"multisig"], Pubkey.new_unique())
    crunch.set_coordinator(APPROVED, owner=bytes(off_curve))
    source.refresh()
    assert ErrorCode.CHAIN_ACCOUNT_INVALID in refused_codes(source)
    assert source.current().registry.crunches[CRUNCH].coordinators == []


# -- CH-4: the checks before a byte is decoded -----------------------------------------------

CERTIFICATE_DEFECTS = {
    "wrong-owner": (dict(program=str(Pubkey.new_unique())), ErrorCode.CHAIN_ACCOUNT_WRONG_OWNER),
    "wrong-discriminator": (dict(tag=_tag("Other")), ErrorCode.CHAIN_ACCOUNT_WRONG_DISCRIMINATOR),
    "truncated": (dict(cut=1), ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE),
    "over-long": (dict(extra=b"\0"), ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE),
}


@pytest.mark.parametrize("defect", CERTIFICATE_DEFECTS)
def test_a_defective_certificate_account_enrols_nothing(crunch, source, defect):
    change, code = CERTIFICATE_DEFECTS[defect]
    good = crunch.certificate_bytes(hashlib.sha256(crunch.coordinator_tls).digest(), bytes(32), 100, 0)
    data = change.get("tag", good[:8]) + good[8:len(good) - change.get("cut", 0)] + change.get("extra", b"")
    crunch.set_certificate(b"", b"", 0, 0, data=data, program=change.get("program"))
    source.refresh()
    assert refused_codes(source) == {code}
    with pytest.raises(AuthError) as refused:
        rules.check_enrolled_tls_key(coordinator_key(source, crunch), hashlib.sha256(crunch.coordinator_tls).digest())
    assert refused.value.code is ErrorCode.COORDINATOR_CERT_NOT_ENROLLED


@pytest.mark.parametrize(("defect", "code"), [
    ("wrong-owner", ErrorCode.CHAIN_ACCOUNT_WRONG_OWNER),
    ("wrong-discriminator", ErrorCode.CHAIN_ACCOUNT_WRONG_DISCRIMINATOR),
    ("truncated", ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE),
    ("over-long", ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE),
    ("unknown-state", ErrorCode.CHAIN_ACCOUNT_INVALID),
])
def test_a_defective_coordinator_account_registers_no_key(crunch, source, defect, code):
    good = ACCOUNTS.coordinator.tag + crunch.owner + bytes([APPROVED]) + borsh("Coordinator One")
    data = {"wrong-discriminator": _tag("Other") + good[8:], "truncated": good[:-1], "over-long": good + b"\0",
            "unknown-state": good[:40] + bytes([3]) + good[41:]}.get(defect, good)
    crunch.set_coordinator(APPROVED, data=data, program=str(Pubkey.new_unique()) if defect == "wrong-owner" else None)
    source.refresh()
    assert refused_codes(source) == {code}
    with pytest.raises(AuthError) as refused:
        coordinator_key(source, crunch)
    assert refused.value.code is ErrorCode.KEY_UNKNOWN


@pytest.mark.parametrize(("tail", "model_id", "code"), [
    (b"\0", "second-model", ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE),
    (b"", "Not_An_Id", ErrorCode.CHAIN_ACCOUNT_INVALID),
])
def test_a_defective_model_account_registers_no_model(crunch, source, tail, model_id, code):
    crunch.add_model(model_id, crunch.wallet, tail=tail)
    source.refresh()
    assert refused_codes(source) == {code}
    verify_runner(source, crunch.wallet_key)  # the crunch's good model is still registered
    with pytest.raises(AuthError) as refused:
        verify_runner(source, crunch.wallet_key, model_id)
    assert refused.value.code is ErrorCode.MODEL_NOT_REGISTERED


def test_a_model_id_claimed_twice_registers_neither(crunch, source):
    squatter = SigningKey.generate()
    crunch.add_cruncher(bytes(squatter.verify_key), bytes(32))
    crunch.add_model(MODEL, bytes(squatter.verify_key))
    source.refresh()
    assert ErrorCode.REGISTRY_AMBIGUOUS in refused_codes(source)
    for signer in (crunch.wallet_key, squatter):
        with pytest.raises(AuthError) as refused:
            verify_runner(source, signer)
        assert refused.value.code is ErrorCode.MODEL_NOT_REGISTERED


def test_a_coordinator_key_claimed_by_two_accounts_is_registered_by_neither(chain, crunch):
    second = bytes(Pubkey.new_unique())  # an Approved twin of the listed coordinator account
    chain.put(second, ACCOUNTS.coordinator.program_id,
              ACCOUNTS.coordinator.tag + crunch.owner + bytes([APPROVED]) + borsh("Twin"))
    source = ChainRegistry(crunch.config(coordinators=[str(Pubkey.from_bytes(crunch.coordinator_account)),
                                                       str(Pubkey.from_bytes(second))]))
    try:
        assert refused_codes(source) == {ErrorCode.REGISTRY_AMBIGUOUS}
        with pytest.raises(AuthError) as refused:
            coordinator_key(source, crunch)
        assert refused.value.code is ErrorCode.KEY_UNKNOWN
    finally:
        source.close()


def test_a_model_whose_wallet_has_no_cruncher_account_is_not_registered(crunch, source):
    stranger = SigningKey.generate()
    crunch.add_model("stranger-model", bytes(stranger.verify_key))
    source.refresh()
    assert refused_codes(source) == {ErrorCode.CHAIN_ACCOUNT_MISSING}
    with pytest.raises(AuthError) as refused:
        verify_runner(source, stranger, "stranger-model")
    assert refused.value.code is ErrorCode.MODEL_NOT_REGISTERED


# -- CH-2: the two certificate slots and rotation ---------------------------------------------

def test_both_slots_empty_enrol_no_tls_key(crunch, source):
    crunch.set_certificate(bytes(32), bytes(32), 0, 0)
    source.refresh()
    assert coordinator_key(source, crunch).enrolled_tls_keys == frozenset()
    with pytest.raises(AuthError) as refused:
        rules.check_enrolled_tls_key(coordinator_key(source, crunch), bytes(32))  # an empty slot never matches
    assert refused.value.code is ErrorCode.COORDINATOR_CERT_NOT_ENROLLED


def enrol(crunch: Crunch, certificate: RawAccount, new_hash: bytes, at: int) -> None:
    """What enrolling does on chain: the empty secondary slot, else the older slot (ties: the primary)."""
    current = decode_certificate(certificate, ACCOUNTS.certificate)
    slots = [current.cert_hash, current.cert_hash_secondary]
    times = [current.primary_updated_at, current.secondary_updated_at]
    slot = 1 if slots[1] == bytes(32) else (0 if times[0] <= times[1] else 1)
    slots[slot], times[slot] = new_hash, at
    crunch.set_certificate(slots[0], slots[1], times[0], times[1])


def test_rotation_through_the_secondary_slot_refuses_the_overwritten_certificate(chain, crunch, source):
    old, new, newest = (hashlib.sha256(spki_der_of_new_key()).digest() for _ in range(3))
    crunch.set_certificate(old, bytes(32), 100, 0)
    source.refresh()
    address = ACCOUNTS.certificate.address_for(crunch.owner)

    def on_chain() -> RawAccount:
        account = chain.svm.get_account(Pubkey.from_bytes(address))
        return RawAccount(address, bytes(account.owner), bytes(account.data))

    enrol(crunch, on_chain(), new, 200)  # into the empty secondary slot: both valid during the overlap
    source.refresh()
    for spki_hash in (old, new):
        rules.check_enrolled_tls_key(coordinator_key(source, crunch), spki_hash)

    enrol(crunch, on_chain(), newest, 300)  # overwrites the older slot: the primary, holding `old`
    assert coordinator_key(source, crunch).enrolled_tls_keys == {old, new}  # not refreshed yet
    source.refresh()
    assert coordinator_key(source, crunch).enrolled_tls_keys == {new, newest}
    with pytest.raises(AuthError) as refused:
        rules.check_enrolled_tls_key(coordinator_key(source, crunch), old)
    assert refused.value.code is ErrorCode.COORDINATOR_CERT_NOT_ENROLLED


# -- refresh, staleness and RPC failures -------------------------------------------------------

def test_rpc_down_longer_than_the_staleness_bound_fails_closed(chain, crunch):
    clock = [1_000_000.0]
    failures: list[ConfigError] = []
    source = ChainRegistry(crunch.config(), on_failure=failures.append, clock=lambda: clock[0])
    try:
        policy = rules.TimePolicy(max_registry_age_seconds=5)
        token_key = crunch.wallet_key
        runner_tls = sha256_b64url(spki_der_of_new_key())

        def verify(at: int) -> None:
            token = issue_delegation(token_key, crunch_id=CRUNCH, model_id=MODEL, spki_sha256=runner_tls,
                                     now=at, lifetime=600)
            rules.verify_delegation(token, registry=source.current(), crunch_id=CRUNCH, model_id=MODEL,
                                    presented_spki_sha256=runner_tls, now=at, policy=policy)

        chain.stop()
        for _ in range(3):
            clock[0] += 2
            with pytest.raises(ConfigError) as failed:
                source.refresh()
            assert failed.value.code is ErrorCode.CHAIN_RPC_UNREACHABLE
        assert not source.healthy and [f.code for f in failures] == [ErrorCode.CHAIN_RPC_UNREACHABLE]
        assert source.current().fetched_at == 1_000_000
        verify(1_000_005)  # within the bound: the last good snapshot still serves
        with pytest.raises(AuthError) as refused:
            verify(1_000_006)
        assert refused.value.code is ErrorCode.REGISTRY_STALE
    finally:
        source.close()


@pytest.mark.parametrize(("mode", "code"), [
    ("rate_limited", ErrorCode.CHAIN_RPC_RATE_LIMITED),
    ("http_error", ErrorCode.CHAIN_RPC_ERROR),
    ("jsonrpc_error", ErrorCode.CHAIN_RPC_ERROR),
    ("garbage", ErrorCode.CHAIN_RPC_ERROR),
    ("wrong_shape", ErrorCode.CHAIN_RPC_ERROR),
    ("oversized", ErrorCode.CHAIN_RPC_ERROR),
    ("slow", ErrorCode.CHAIN_RPC_TIMEOUT),
])
def test_rpc_failures_are_typed_and_keep_the_last_snapshot(chain, crunch, mode, code):
    source = ChainRegistry(crunch.config(timeout_seconds=0.3, max_response_bytes=1024))
    try:
        before = source.current()
        chain.mode = mode
        with pytest.raises(ConfigError) as failed:
            source.refresh()
        assert failed.value.code is code
        assert source.current() is before and not source.healthy
        chain.mode = "ok"
        source.refresh()
        assert source.healthy and source.current().fetched_at >= before.fetched_at
    finally:
        source.close()


def test_the_first_read_must_succeed(chain, crunch):
    config = crunch.config()
    chain.stop()
    with pytest.raises(ConfigError) as failed:
        ChainRegistry(config)
    assert failed.value.code is ErrorCode.CHAIN_RPC_UNREACHABLE


async def test_the_refresh_thread_survives_failures_shows_them_in_health_and_carries_revocation(chain, crunch, source):
    """The runner's own registry health watcher (`watch_registry`) over a real health servicer."""
    health = HealthServicer()
    await health.set(REGISTRY_HEALTH_SERVICE, health_pb2.HealthCheckResponse.UNKNOWN)  # known before the first look
    watcher = asyncio.create_task(watch_registry(source, health, REGISTRY_HEALTH_SERVICE, interval=0.05))

    async def health_becomes(status: int) -> None:
        request = health_pb2.HealthCheckRequest(service=REGISTRY_HEALTH_SERVICE)
        for _ in range(60):
            if (await health.Check(request, None)).status == status:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"registry health never became {status}")

    try:
        source.start()
        await health_becomes(health_pb2.HealthCheckResponse.SERVING)
        chain.mode = "jsonrpc_error"
        await health_becomes(health_pb2.HealthCheckResponse.NOT_SERVING)
        chain.mode = "ok"
        crunch.set_coordinator(REJECTED)
        revoked_at = time.monotonic()
        await health_becomes(health_pb2.HealthCheckResponse.SERVING)
        with pytest.raises(AuthError) as refused:
            coordinator_key(source, crunch)
        assert refused.value.code is ErrorCode.KEY_REVOKED
        assert time.monotonic() - revoked_at < 2.5  # one 1 s interval, one refresh, a loaded machine's margin
    finally:
        watcher.cancel()


@pytest.mark.parametrize("change", [
    {"refresh_interval_seconds": 2}, {"crunch_address": "not base58"}, {"crunch_id": "Not_An_Id"},
    {"rpc_url": "file:///etc/passwd"}, {"coordinators": []}, {"unknown": 1},
    {"coordinators": [str(Pubkey.default())] * 2},
])
def test_a_bad_configuration_is_refused(crunch, change):
    data = crunch.config().model_dump() | change
    with pytest.raises(ConfigError) as refused:
        ChainRegistryConfig.from_json(json.dumps(data))
    assert refused.value.code is ErrorCode.REGISTRY_INVALID


# -- the pure decoders: nothing but typed refusals -------------------------------------------

DECODERS = [(decode_certificate, ACCOUNTS.certificate), (decode_coordinator, ACCOUNTS.coordinator),
            (decode_cruncher, ACCOUNTS.cruncher), (decode_model, ACCOUNTS.model)]


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), which=st.integers(0, 3), tagged=st.booleans())
def test_fuzzed_account_bytes_only_raise_typed_errors(body, which, tagged):
    decoder, kind = DECODERS[which]
    raw = RawAccount(bytes(32), kind.owner, (kind.tag if tagged else b"") + body)
    try:
        decoder(raw, kind)
    except ConfigError as exc:
        assert exc.code.startswith("CHAIN_ACCOUNT_")


# -- section 3: the reference's enrolment, with real signed messages ---------------------------

REFERENCE_WALLET = "9JfTnZhNfj6KdsEQrfab3SpPNZrTdX2V3VD9DdrXswtP"  # the vectors' (README there)
REFERENCE_HOTKEY = "9KCvyig9gonuTjvJSobK8FqHp14qGUcS3cuTiZS72CZv"
LEGACY_WALLET = "GKgkFy6ewf1j2oFtjAs8KNjoZMzwUiEf8Qt3MJba2hdD"


def reference_crunch(chain: Chain, wallet: str) -> ChainRegistry:
    """A crunch whose models 13367 and other-model belong to `wallet`, with the vectors' hotkey."""
    crunch = Crunch(chain, bytes(Pubkey.from_string(wallet)), bytes(Pubkey.from_string(REFERENCE_HOTKEY)))
    crunch.add_model("other-model", crunch.wallet)
    return ChainRegistry(crunch.config())


def vector_spki(name: str = "tls.crt") -> str:
    cert = x509.load_pem_x509_certificate((VECTORS / name).read_bytes())
    return sha256_b64url(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture
def reference(chain: Chain) -> Iterator[tuple[bytes, ChainRegistry]]:
    envelope = (VECTORS / "cruncher_msg.json").read_bytes()
    source = reference_crunch(chain, REFERENCE_WALLET)
    yield envelope, source
    source.close()


def check_reference(envelope: bytes, source: ChainRegistry, *, model_id: str = MODEL,
                    spki: str | None = None, hotkeys: dict | None = None, snapshot: RegistrySnapshot | None = None):
    return verify_reference_enrolment(
        envelope, registry=snapshot or source.current(),
        hotkeys=source.facts().hotkeys if hotkeys is None else hotkeys, crunch_id=CRUNCH, model_id=model_id,
        presented_spki_sha256=spki or vector_spki(), now=now())


def test_a_real_reference_enrolment_is_accepted_as_a_delegation(reference):
    envelope, source = reference
    claims = check_reference(envelope, source)
    assert claims.model_id == MODEL
    assert claims.hotkey == bytes(Pubkey.from_string(REFERENCE_HOTKEY))


def _with_message_changed(envelope: bytes, change) -> bytes:
    """The envelope with its message changed after signing (the signature kept)."""
    fields = json.loads(envelope)
    fields["message_b64"] = base64.b64encode(change(base64.b64decode(fields["message_b64"]))).decode()
    return json.dumps(fields).encode()


REFERENCE_REFUSALS = {
    "empty": (lambda e: b"", {}, ErrorCode.DELEGATION_MISSING),
    "oversized": (lambda e: e + b" " * 4096, {}, ErrorCode.DELEGATION_MALFORMED),
    "repeated-member": (lambda e: e.rstrip()[:-1] + f',"wallet_pubkey_b58":"{REFERENCE_WALLET}"}}'.encode(), {},
                        ErrorCode.DELEGATION_MALFORMED),  # the same value twice: still ambiguous, refused
    "changed-message": (lambda e: _with_message_changed(e, lambda m: m.replace(b"13367", b"13368")), {},
                             ErrorCode.DELEGATION_BAD_SIGNATURE),
    "other-model": (lambda e: e, {"model_id": "other-model"}, ErrorCode.DELEGATION_WRONG_MODEL),
    "unregistered-model": (lambda e: e, {"model_id": "absent"}, ErrorCode.MODEL_NOT_REGISTERED),
    "other-tls-key": (lambda e: e, {"spki": "legacy_tls.crt"}, ErrorCode.DELEGATION_KEY_MISMATCH),
    "other-hotkey": (lambda e: e, {"hotkeys": {}}, ErrorCode.DELEGATION_WRONG_HOTKEY),
    "stale-registry": (lambda e: e, {"stale": True}, ErrorCode.REGISTRY_STALE),
}


@pytest.mark.parametrize("case", REFERENCE_REFUSALS)
def test_reference_enrolment_refusals(reference, case):
    change, options, code = REFERENCE_REFUSALS[case]
    envelope, source = reference
    snapshot = RegistrySnapshot(source.current().registry, now() - 3600) if options.get("stale") else None
    with pytest.raises(AuthError) as refused:
        check_reference(change(envelope), source, model_id=options.get("model_id", MODEL),
                        spki=vector_spki(options["spki"]) if "spki" in options else None,
                        hotkeys=options.get("hotkeys"), snapshot=snapshot)
    assert refused.value.code is code


def test_every_flipped_bit_of_a_reference_enrolment_is_refused_with_a_typed_error(reference):
    envelope, source = reference
    for position in range(len(envelope)):
        for bit in (0x01, 0x20):  # 0x20 also turns letters' case: base58 and base64 are case-sensitive
            with pytest.raises(AuthError):
                check_reference(envelope[:position] + bytes([envelope[position] ^ bit]) + envelope[position + 1:], source)


def test_a_reference_enrolment_signed_by_another_wallet_is_refused(reference):
    _, source = reference  # model 13367 belongs to the current vector's wallet
    legacy = (VECTORS / "legacy_cruncher_msg.json").read_bytes()  # real, signed by another wallet
    with pytest.raises(AuthError) as refused:
        check_reference(legacy, source, spki=vector_spki("legacy_tls.crt"))
    assert refused.value.code is ErrorCode.DELEGATION_BAD_SIGNATURE


def test_the_older_form_without_model_or_hotkey_is_refused_even_with_a_valid_signature(chain):
    source = reference_crunch(chain, LEGACY_WALLET)  # here the legacy vector's wallet owns model 13367
    try:
        with pytest.raises(AuthError) as refused:
            check_reference((VECTORS / "legacy_cruncher_msg.json").read_bytes(), source,
                            spki=vector_spki("legacy_tls.crt"))
        assert refused.value.code is ErrorCode.DELEGATION_MALFORMED  # the signature verified; the form is refused
    finally:
        source.close()
