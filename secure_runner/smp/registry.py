"""The registry: who may call a crunch's models, and who the models are.

It maps a crunch id to its authorized coordinator signing keys and operator
signing keys (the same entry schema: a validity window and a revocation flag)
and to its models (model id -> name and cruncher identity). In production the
same data is read from the chain by an adapter; the embedded default is a JSON
file (`Registry.from_json`). This module is pure: parsing bytes and answering
lookups, no file or network I/O.

An ambiguous registry is refused as a whole (REGISTRY_AMBIGUOUS): a key id listed
twice in a crunch (in one section or across `coordinators` and `operators`), a
model id listed twice, or a JSON member repeated anywhere (a crunch id, a
`revoked` flag). Otherwise which entry wins would be up to the parser, and a
revocation added as a second entry could silently do nothing.

A registry source (the file adapter, a chain adapter) hands the rules a
`RegistrySnapshot`: the registry plus the time it was last fetched successfully,
from which `rules` decides whether it is too stale to authorize anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from secure_runner.errors import AuthError, ConfigError, ErrorCode
from secure_runner.smp.identity import Role, validate_id

ED25519_PUBLIC_KEY_BYTES = 32


def key_id_for(public_raw: bytes) -> str:
    """The registry's id of a raw Ed25519 public key: "k" + first 24 hex digits of its SHA-256."""
    if len(public_raw) != ED25519_PUBLIC_KEY_BYTES:
        raise ConfigError(ErrorCode.PKI_INVALID, f"an Ed25519 public key is 32 bytes, got {len(public_raw)}")
    return "k" + hashlib.sha256(public_raw).hexdigest()[:24]


def decode_public_key(value: str) -> bytes:
    """Decode a base64 Ed25519 public key (32 raw bytes)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError("public key is not valid base64") from None
    if len(raw) != ED25519_PUBLIC_KEY_BYTES:
        raise ValueError(f"public key must be {ED25519_PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return raw


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CoordinatorKey(_Strict):
    """A registered signing key: a coordinator's or, with the same schema, an operator's."""

    key_id: str
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")
    not_before: AwareDatetime | None = None
    not_after: AwareDatetime | None = None
    revoked: bool = False
    # The SHA-256s of the TLS SubjectPublicKeyInfos enrolled for this key (the chain's certificate
    # slots, SMP-5a); None: the source does not bind TLS keys to signing keys (the file adapter).
    enrolled_tls_keys: frozenset[bytes] | None = Field(None, exclude=True)

    _check_id = field_validator("key_id")(lambda v: validate_id(v, "key id"))

    @field_validator("public_key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        decode_public_key(value)
        return value

    @property
    def public_key_bytes(self) -> bytes:
        return decode_public_key(self.public_key)


class ModelEntry(_Strict):
    model_id: str
    model_name: str = ""
    cruncher_id: str = ""
    cruncher_name: str = ""
    identity_public_key: str | None = None
    hotkey: str | None = Field(None, description="base64 of the cruncher's registered hotkey (chain adapter)")

    _check_id = field_validator("model_id")(lambda v: validate_id(v, "model id"))

    @field_validator("identity_public_key", "hotkey")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is not None:
            decode_public_key(value)
        return value


def _ambiguous(what: str, ids: list[str]) -> None:
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise ConfigError(ErrorCode.REGISTRY_AMBIGUOUS, f"{what} listed more than once: {', '.join(repeated)}")


class CrunchEntry(_Strict):
    coordinators: list[CoordinatorKey] = []
    operators: list[CoordinatorKey] = []
    models: list[ModelEntry] = []

    @model_validator(mode="after")
    def _unambiguous(self) -> CrunchEntry:
        """One entry per key id (across both key sections) and per model id."""
        _ambiguous("key id", [k.key_id for k in (*self.coordinators, *self.operators)])
        _ambiguous("model id", [m.model_id for m in self.models])
        return self

    def keys_of(self, role: Role) -> list[CoordinatorKey]:
        """The signing keys registered for `role` (coordinator or operator)."""
        if role is Role.COORDINATOR:
            return self.coordinators
        if role is Role.OPERATOR:
            return self.operators
        return []


def _refuse_repeated_members(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads hook: a JSON object that names a member twice is ambiguous."""
    _ambiguous("JSON member", [name for name, _ in pairs])
    return dict(pairs)


class Registry(_Strict):
    version: int = Field(1, ge=1, le=1)
    crunches: dict[str, CrunchEntry]

    @field_validator("crunches")
    @classmethod
    def _check_crunch_ids(cls, value: dict[str, CrunchEntry]) -> dict[str, CrunchEntry]:
        for crunch_id in value:
            validate_id(crunch_id, "crunch id")
        return value

    @classmethod
    def from_json(cls, data: bytes | str) -> Registry:
        """Parse a registry; ConfigError(REGISTRY_AMBIGUOUS or REGISTRY_INVALID) if it is not usable."""
        try:
            return cls.model_validate(json.loads(data, object_pairs_hook=_refuse_repeated_members))
        except ConfigError as exc:
            code = exc.code if exc.code is ErrorCode.REGISTRY_AMBIGUOUS else ErrorCode.REGISTRY_INVALID
            raise ConfigError(code, f"registry file is invalid: {exc.message}") from None
        except (ValidationError, ValueError, RecursionError) as exc:
            raise ConfigError(ErrorCode.REGISTRY_INVALID, f"registry file is invalid: {exc}") from None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    def coordinator_key(self, crunch_id: str, key_id: str, now: datetime) -> CoordinatorKey:
        """The coordinator key `key_id` if it is registered for `crunch_id`, not revoked and valid at `now`."""
        return self.signing_key(Role.COORDINATOR, crunch_id, key_id, now)

    def operator_key(self, crunch_id: str, key_id: str, now: datetime) -> CoordinatorKey:
        """The operator key `key_id` if it is registered for `crunch_id`, not revoked and valid at `now`."""
        return self.signing_key(Role.OPERATOR, crunch_id, key_id, now)

    def signing_key(self, role: Role, crunch_id: str, key_id: str, now: datetime) -> CoordinatorKey:
        """The key `key_id` of `role` if it is registered for `crunch_id`, not revoked and valid at `now`."""
        crunch = self.crunches.get(crunch_id)
        key = next((k for k in crunch.keys_of(role) if k.key_id == key_id), None) if crunch else None
        if key is None:
            raise AuthError(ErrorCode.KEY_UNKNOWN, f"{role} key {key_id!r} is not registered for crunch {crunch_id!r}")
        if key.revoked:
            raise AuthError(ErrorCode.KEY_REVOKED, f"key {key_id!r} is revoked")
        if (key.not_before and now < key.not_before) or (key.not_after and now >= key.not_after):
            raise AuthError(ErrorCode.KEY_NOT_VALID_NOW, f"key {key_id!r} is outside its validity window")
        return key

    def model(self, crunch_id: str, model_id: str) -> ModelEntry | None:
        crunch = self.crunches.get(crunch_id)
        if crunch is None:
            return None
        return next((m for m in crunch.models if m.model_id == model_id), None)


@dataclass(frozen=True)
class RegistrySnapshot:
    """A registry as a source last fetched it; `rules` refuses calls when `fetched_at` is too old."""

    registry: Registry
    fetched_at: int  # unix seconds of the last successful fetch (or check that nothing changed)


class RegistrySource(Protocol):
    """Where the services get the registry: the file adapter, a chain adapter.

    `current()` returns the latest snapshot and raises only `ConfigError` (whatever
    the implementation). A failed refresh is not an error here: the last good
    snapshot is returned with its old `fetched_at`, and staleness is decided by
    `rules.current_registry` (REGISTRY_STALE).
    """

    def current(self) -> RegistrySnapshot: ...
