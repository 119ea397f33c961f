"""The registry: who may call a crunch's models, and who the models are.

It maps a crunch id to its authorized coordinator signing keys (each with a
validity window and a revocation flag) and to its models (model id -> name and
cruncher identity). In production the same data is read from the chain by an
adapter; the embedded default is a JSON file (`Registry.from_json`). This
module is pure: parsing bytes and answering lookups, no file or network I/O.
"""

from __future__ import annotations

import base64
from datetime import datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from secure_runner.errors import AuthError, ConfigError, ErrorCode
from secure_runner.smp.identity import validate_id

ED25519_PUBLIC_KEY_BYTES = 32


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
    key_id: str
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")
    not_before: AwareDatetime | None = None
    not_after: AwareDatetime | None = None
    revoked: bool = False

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

    _check_id = field_validator("model_id")(lambda v: validate_id(v, "model id"))

    @field_validator("identity_public_key")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is not None:
            decode_public_key(value)
        return value


class CrunchEntry(_Strict):
    coordinators: list[CoordinatorKey] = []
    models: list[ModelEntry] = []


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
        try:
            return cls.model_validate_json(data)
        except (ValidationError, ConfigError) as exc:
            raise ConfigError(ErrorCode.REGISTRY_INVALID, f"registry file is invalid: {exc}") from None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    def coordinator_key(self, crunch_id: str, key_id: str, now: datetime) -> CoordinatorKey:
        """The key `key_id` if it is registered for `crunch_id`, not revoked and valid at `now`."""
        crunch = self.crunches.get(crunch_id)
        key = next((k for k in crunch.coordinators if k.key_id == key_id), None) if crunch else None
        if key is None:
            raise AuthError(ErrorCode.KEY_UNKNOWN, f"key {key_id!r} is not registered for crunch {crunch_id!r}")
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
