"""How the chain's accounts map onto the Secure Model Protocol's registry (pure, no I/O).

The rules (SECURITY.md, "Registry: the on-chain adapter"; CH-6..CH-8 are `chain.py`'s):

  CH-1  A coordinator's call-token signing key is the owner wallet of a coordinator
        account listed for the crunch in the configuration. Approved: registered
        (key id `k` + 24 hex digits of SHA-256 of the key, as for every coordinator key).
        Rejected: registered as revoked (KEY_REVOKED). Pending: left out (KEY_UNKNOWN).
        An owner that is not an Ed25519 curve point (a PDA or a multisig: nobody holds its
        private key) cannot sign and is refused (CHAIN_ACCOUNT_INVALID).
  CH-2  A coordinator's TLS key is enrolled when the SHA-256 of its SubjectPublicKeyInfo is
        in a non-empty slot of the certificate account at the PDA of its owner, whose
        `coordinator` field names that owner. No account, or both slots empty: no TLS key
        of that coordinator is enrolled. The hashes become the key's `enrolled_tls_keys`, which
        `smp.rules` checks against the caller's certificate (SMP-5a, COORDINATOR_CERT_NOT_ENROLLED).
  CH-3  A model is registered when a model account of this crunch names it and its cruncher
        wallet has a cruncher account (at the PDA of the wallet). The cruncher's identity key
        (the signer of its runners' delegations, ours and the reference's enrolment) is that
        wallet; its hotkey is the model entry's `hotkey`, for the reference enrolment's hotkey check.
  CH-4  An account failing a check is left out, and the refusal is kept with its code
        (the crunch's other entries stay usable; what was left out is unknown, never trusted).
  CH-5  Two accounts claiming one coordinator key or one model id: both are left out
        (REGISTRY_AMBIGUOUS), so which one wins is never up to the order of an RPC answer.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from solders.pubkey import Pubkey

from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.registry.solana_accounts import (
    AccountType,
    CoordinatorAccount,
    CoordinatorCertificate,
    CoordinatorState,
    CruncherAccount,
    ModelAccount,
    RawAccount,
    address_text,
)
from secure_runner.smp.registry import CoordinatorKey, CrunchEntry, ModelEntry, Registry, key_id_for

_Decoded = TypeVar("_Decoded")


@dataclass(frozen=True)
class ChainFacts:
    """What the chain says beyond the `Registry` model, read in the same refresh."""

    hotkeys: Mapping[bytes, bytes] = field(default_factory=dict)  # cruncher wallet -> hotkey
    refused: tuple[ConfigError, ...] = ()  # accounts left out, each with its reason (CH-4, CH-5)


def decode_each(
    raws: Iterable[RawAccount], decoder: Callable[[RawAccount, AccountType], _Decoded], kind: AccountType,
    refused: list[ConfigError],
) -> dict[bytes, _Decoded]:
    """Decode every account by address; a refusal is recorded and the account left out (CH-4)."""
    decoded: dict[bytes, _Decoded] = {}
    for raw in raws:
        try:
            decoded[raw.address] = decoder(raw, kind)
        except ConfigError as exc:
            refused.append(exc)
    return decoded


def _unique_by(items: dict[bytes, _Decoded], key: Callable[[_Decoded], object], what: str,
               refused: list[ConfigError]) -> list[_Decoded]:
    """CH-5: the items whose key no other item claims."""
    counts = Counter(key(item) for item in items.values())
    kept = []
    for address, item in items.items():
        if counts[key(item)] > 1:
            refused.append(ConfigError(
                ErrorCode.REGISTRY_AMBIGUOUS, f"{what} account {address_text(address)}: another account claims it too"))
        else:
            kept.append(item)
    return kept


def coordinator_keys(coordinators: dict[bytes, CoordinatorAccount], refused: list[ConfigError]) -> list[CoordinatorKey]:
    """CH-1 and CH-5."""
    keys = []
    for account in _unique_by(coordinators, lambda c: c.owner, "coordinator", refused):
        if account.state is CoordinatorState.PENDING:
            continue
        if not Pubkey.from_bytes(account.owner).is_on_curve():
            refused.append(ConfigError(ErrorCode.CHAIN_ACCOUNT_INVALID, (
                f"coordinator {address_text(account.owner)} ({account.name[:64]!r}) is not a wallet "
                "(off the Ed25519 curve): it cannot sign call tokens")))
            continue
        keys.append(CoordinatorKey(
            key_id=key_id_for(account.owner),
            public_key=base64.b64encode(account.owner).decode(),
            revoked=account.state is CoordinatorState.REJECTED,
        ))
    return keys


def with_enrolled_tls_keys(
    keys: list[CoordinatorKey], certificates: Mapping[bytes, CoordinatorCertificate], refused: list[ConfigError]
) -> list[CoordinatorKey]:
    """CH-2: each key with its `enrolled_tls_keys`; `certificates` maps each owner to the account at its PDA."""
    enrolled = []
    for key in keys:
        owner = key.public_key_bytes
        certificate = certificates.get(owner)
        if certificate is not None and certificate.coordinator != owner:
            refused.append(ConfigError(ErrorCode.CHAIN_ACCOUNT_INVALID, (
                f"certificate account of {address_text(owner)} names coordinator {address_text(certificate.coordinator)}")))
            certificate = None
        hashes = certificate.enrolled_spki_hashes if certificate else frozenset()
        enrolled.append(key.model_copy(update={"enrolled_tls_keys": hashes}))
    return enrolled


def model_entries(
    crunch_address: bytes, models: dict[bytes, ModelAccount], crunchers: Mapping[bytes, CruncherAccount],
    refused: list[ConfigError],
) -> list[ModelEntry]:
    """CH-3 and CH-5: `crunchers` maps each wallet to the cruncher account found at its PDA."""
    entries = []
    for model in _unique_by(models, lambda m: m.model_id, "model", refused):
        cruncher = crunchers.get(model.cruncher_wallet)
        wallet = address_text(model.cruncher_wallet)
        if model.crunch != crunch_address:
            refused.append(ConfigError(ErrorCode.CHAIN_ACCOUNT_INVALID, f"model {model.model_id!r} is of another crunch"))
        elif cruncher is None or cruncher.wallet != model.cruncher_wallet:
            refused.append(ConfigError(
                ErrorCode.CHAIN_ACCOUNT_MISSING, f"model {model.model_id!r}: wallet {wallet} has no cruncher account"))
        else:
            entries.append(ModelEntry(
                model_id=model.model_id,
                model_name=model.model_name,
                cruncher_id=wallet,
                identity_public_key=base64.b64encode(model.cruncher_wallet).decode(),
                hotkey=base64.b64encode(cruncher.hotkey).decode(),
            ))
    return entries


def build_registry(
    crunch_id: str, keys: list[CoordinatorKey], entries: list[ModelEntry]
) -> Registry:
    """The `Registry` value the rules read, for one crunch. Unambiguous by construction (CH-5)."""
    return Registry(crunches={crunch_id: CrunchEntry(coordinators=keys, models=entries)})

