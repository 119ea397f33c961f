"""The Solana accounts the chain registry reads: where they live, their layouts, pure decoders.

No I/O here: `chain.py` fetches account bytes and hands them over as `RawAccount`s.
Every decoder checks, before it reads a field, in this order: the owner program is the
configured one (CHAIN_ACCOUNT_WRONG_OWNER), the first 8 bytes are the configured
discriminator (CHAIN_ACCOUNT_WRONG_DISCRIMINATOR), and the length is exactly the layout's
(CHAIN_ACCOUNT_WRONG_SIZE). Fields are then read with explicit little-endian `struct`
formats; a value outside its range is CHAIN_ACCOUNT_INVALID. Each refusal is a
`ConfigError` naming the account's address.

What is verified from public CrunchDAO sources (read 2026-12; facts, no code taken):
- The coordinator certificate account: 8-byte discriminator, `coordinator` (32),
  `cert_hash` (32), `cert_hash_secondary` (32), `primary_updated_at` (i64),
  `secondary_updated_at` (i64), `bump` (u8) = 121 bytes, little-endian
  (crunchdao/coordinator-webapp `.pi/skills/solana/SKILL.md`, its decode field list).
- A hash is the SHA-256 of the TLS key's DER SubjectPublicKeyInfo; an all-zero slot is
  empty; enrolling writes slot 0 when there is no certificate, slot 1 when the secondary is
  empty, else the slot with the older `*_updated_at` (ties: the primary)
  (coordinator-webapp `useEnrollCertificate`; crunchdao/model-runner
  `security/gateway_auth.py` skips all-zero hashes and compares SHA-256 hex of the SPKI).
- The certificate account is looked up by the coordinator's *authority* (its wallet, or a
  multisig) under the coordinator program (`getCoordinatorCertificate(program, authority)`).
- Crunchers are wallets with a registered hotkey (model-runner's CRUNCHER_WALLET_PUBKEY /
  CRUNCHER_HOTKEY settings; crunch-certificate's `/hotkeys?wallet=` lookup).

What is NOT public, hence configuration (`ChainAccountsConfig`), never a constant here:
program ids, discriminators and PDA seeds of every account type. And the layouts of the
coordinator, cruncher and model accounts are not public either: the ones below are
**this project's own layouts**, labelled OUR LAYOUT, for a deployment that writes them (and
for the tests); a deployment reading CrunchDAO's real accounts must check them against the
real program first.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from solders.pubkey import Pubkey

from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.smp.identity import validate_id

DISCRIMINATOR_BYTES = 8
PUBKEY_BYTES = 32
EMPTY_SLOT = bytes(32)
MAX_NAME_BYTES = 64
SEED_KEY = "{key}"  # in a seed list: the 32 bytes of the key the account belongs to


def pubkey_bytes(value: str) -> bytes:
    """The 32 bytes of a base58 Solana address; ValueError if it is not one."""
    try:
        return bytes(Pubkey.from_string(value))
    except ValueError:
        raise ValueError(f"{value[:64]!r} is not a base58 Solana address") from None


def address_text(raw: bytes) -> str:
    return str(Pubkey.from_bytes(raw))


def _valid_address(value: str) -> str:
    pubkey_bytes(value)
    return value


Address = Annotated[str, AfterValidator(_valid_address)]  # a base58 Solana address, in a configuration


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AccountType(_Config):
    """Where accounts of one type live: the program that owns them and their discriminator."""

    program_id: Address = Field(description="base58 address of the owning program")
    discriminator: str = Field(description="the first 8 bytes of every such account, as 16 hex digits")

    @field_validator("discriminator")
    @classmethod
    def _check_discriminator(cls, value: str) -> str:
        if len(bytes.fromhex(value)) != DISCRIMINATOR_BYTES:
            raise ValueError(f"a discriminator is {DISCRIMINATOR_BYTES} bytes")
        return value

    @property
    def owner(self) -> bytes:
        return pubkey_bytes(self.program_id)

    @property
    def tag(self) -> bytes:
        return bytes.fromhex(self.discriminator)


class PdaType(AccountType):
    """An account type found at a program-derived address of the key it belongs to."""

    seeds: list[str] = Field(
        min_length=1, max_length=16,
        description=f"PDA seeds in order: {SEED_KEY!r} is the 32-byte key, any other string its UTF-8 bytes",
    )

    def address_for(self, key: bytes) -> bytes:
        """The PDA of `key` under this type's program (the canonical bump)."""
        seeds = [key if seed == SEED_KEY else seed.encode() for seed in self.seeds]
        address, _bump = Pubkey.find_program_address(seeds, Pubkey.from_bytes(self.owner))
        return bytes(address)


class ChainAccountsConfig(_Config):
    """The deployment's answer to everything the public sources do not show."""

    coordinator: AccountType = Field(description="coordinator accounts (OUR LAYOUT)")
    certificate: PdaType = Field(description="coordinator certificate accounts, PDA of the coordinator's owner")
    cruncher: PdaType = Field(description="cruncher accounts (OUR LAYOUT), PDA of the cruncher's wallet")
    model: AccountType = Field(description="model accounts (OUR LAYOUT), listed by crunch")


@dataclass(frozen=True)
class RawAccount:
    """An account as the RPC returned it (`getAccountInfo` value, base64 data decoded)."""

    address: bytes
    owner: bytes
    data: bytes


class CoordinatorState(IntEnum):
    PENDING = 0
    APPROVED = 1
    REJECTED = 2


@dataclass(frozen=True)
class CoordinatorCertificate:
    coordinator: bytes
    cert_hash: bytes
    cert_hash_secondary: bytes
    primary_updated_at: int
    secondary_updated_at: int
    bump: int

    @property
    def enrolled_spki_hashes(self) -> frozenset[bytes]:
        """SHA-256 hashes of the TLS public keys enrolled now: the non-empty slots."""
        return frozenset(h for h in (self.cert_hash, self.cert_hash_secondary) if h != EMPTY_SLOT)


@dataclass(frozen=True)
class CoordinatorAccount:
    owner: bytes
    state: CoordinatorState
    name: str


@dataclass(frozen=True)
class CruncherAccount:
    wallet: bytes
    hotkey: bytes


@dataclass(frozen=True)
class ModelAccount:
    crunch: bytes
    cruncher_wallet: bytes
    model_id: str
    model_name: str


def _refuse(code: ErrorCode, raw: RawAccount, what: str, reason: str) -> ConfigError:
    return ConfigError(code, f"{what} account {address_text(raw.address)}: {reason}")


def _checked_body(raw: RawAccount, kind: AccountType, what: str, minimum: int) -> bytes:
    """Owner, discriminator, then at least `minimum` bytes: the data after the discriminator."""
    if raw.owner != kind.owner:
        raise _refuse(ErrorCode.CHAIN_ACCOUNT_WRONG_OWNER, raw, what, f"owned by {address_text(raw.owner)}")
    if raw.data[:DISCRIMINATOR_BYTES] != kind.tag:
        raise _refuse(ErrorCode.CHAIN_ACCOUNT_WRONG_DISCRIMINATOR, raw, what, "discriminator is not the configured one")
    if len(raw.data) < minimum:
        raise _refuse(ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE, raw, what, f"{len(raw.data)} bytes, under {minimum}")
    return raw.data[DISCRIMINATOR_BYTES:]


def _exact(raw: RawAccount, what: str, size: int) -> None:
    if len(raw.data) != size:
        raise _refuse(ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE, raw, what, f"{len(raw.data)} bytes, layout has {size}")


class _Strings:
    """Borsh strings (u32 little-endian length, UTF-8) read one after another."""

    _LENGTH = struct.Struct("<I")

    def __init__(self, raw: RawAccount, what: str, data: bytes) -> None:
        self._raw, self._what, self._data, self._at = raw, what, data, 0

    def take(self, field: str, limit: int) -> str:
        if len(self._data) - self._at < self._LENGTH.size:
            raise _refuse(ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE, self._raw, self._what, f"truncated before {field}")
        (length,) = self._LENGTH.unpack_from(self._data, self._at)
        start = self._at + self._LENGTH.size
        if length > len(self._data) - start:
            raise _refuse(ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE, self._raw, self._what, f"truncated in {field}")
        if length > limit:
            raise _refuse(ErrorCode.CHAIN_ACCOUNT_INVALID, self._raw, self._what, f"{field} is over {limit} bytes")
        self._at = start + length
        try:
            return self._data[start:self._at].decode("utf-8")
        except UnicodeDecodeError:
            raise _refuse(ErrorCode.CHAIN_ACCOUNT_INVALID, self._raw, self._what, f"{field} is not UTF-8") from None

    def end(self) -> None:
        if self._at != len(self._data):
            raise _refuse(ErrorCode.CHAIN_ACCOUNT_WRONG_SIZE, self._raw, self._what, "bytes after the last field")


# Verified layout (public): discriminator, coordinator, cert_hash, cert_hash_secondary,
# primary_updated_at, secondary_updated_at, bump.
CERTIFICATE_LAYOUT = struct.Struct("<8s32s32s32sqqB")
assert CERTIFICATE_LAYOUT.size == 121


def decode_certificate(raw: RawAccount, kind: AccountType) -> CoordinatorCertificate:
    _checked_body(raw, kind, "certificate", 0)
    _exact(raw, "certificate", CERTIFICATE_LAYOUT.size)
    _, coordinator, primary, secondary, primary_at, secondary_at, bump = CERTIFICATE_LAYOUT.unpack(raw.data)
    return CoordinatorCertificate(coordinator, primary, secondary, primary_at, secondary_at, bump)


# OUR LAYOUT: discriminator, owner (32), state (u8: 0 Pending, 1 Approved, 2 Rejected),
# name (borsh string, at most 64 bytes). The public sources name these fields, not their order.
COORDINATOR_HEADER = struct.Struct("<8s32sB")


def decode_coordinator(raw: RawAccount, kind: AccountType) -> CoordinatorAccount:
    body = _checked_body(raw, kind, "coordinator", COORDINATOR_HEADER.size)
    _, owner, state = COORDINATOR_HEADER.unpack_from(raw.data)
    strings = _Strings(raw, "coordinator", body[COORDINATOR_HEADER.size - DISCRIMINATOR_BYTES:])
    name = strings.take("name", MAX_NAME_BYTES)
    strings.end()
    if state not in CoordinatorState._value2member_map_:
        raise _refuse(ErrorCode.CHAIN_ACCOUNT_INVALID, raw, "coordinator", f"unknown state {state}")
    return CoordinatorAccount(owner, CoordinatorState(state), name)


# OUR LAYOUT: discriminator, wallet (32), hotkey (32) = 72 bytes.
CRUNCHER_LAYOUT = struct.Struct("<8s32s32s")


def decode_cruncher(raw: RawAccount, kind: AccountType) -> CruncherAccount:
    _checked_body(raw, kind, "cruncher", 0)
    _exact(raw, "cruncher", CRUNCHER_LAYOUT.size)
    _, wallet, hotkey = CRUNCHER_LAYOUT.unpack(raw.data)
    return CruncherAccount(wallet, hotkey)


# OUR LAYOUT: discriminator, crunch (32, the crunch's on-chain address), cruncher wallet (32),
# model id (borsh string, a valid id), model name (borsh string, at most 64 bytes).
MODEL_HEADER = struct.Struct("<8s32s32s")
MODEL_CRUNCH_OFFSET = DISCRIMINATOR_BYTES  # where getProgramAccounts filters a crunch's models


def decode_model(raw: RawAccount, kind: AccountType) -> ModelAccount:
    body = _checked_body(raw, kind, "model", MODEL_HEADER.size)
    _, crunch, wallet = MODEL_HEADER.unpack_from(raw.data)
    strings = _Strings(raw, "model", body[MODEL_HEADER.size - DISCRIMINATOR_BYTES:])
    model_id = strings.take("model id", 63)
    name = strings.take("model name", MAX_NAME_BYTES)
    strings.end()
    try:
        validate_id(model_id, "model id")
    except ConfigError as exc:
        raise _refuse(ErrorCode.CHAIN_ACCOUNT_INVALID, raw, "model", exc.message) from None
    return ModelAccount(crunch, wallet, model_id, name)
