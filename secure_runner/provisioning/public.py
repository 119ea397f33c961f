"""The public material parties hand the crunch operator for the registry: strict JSON, nothing secret.

Each file is parsed strictly (unknown members refused), so a private key file or a
hand-edited entry with a key id that does not match its key never reaches the registry.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from secure_runner import pki
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.smp.identity import Role, validate_id
from secure_runner.smp.registry import decode_public_key


class _Public(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SignerKey(_Public):
    key_id: str
    public_key: str = Field(description="base64 of the raw Ed25519 public key (signs call tokens)")
    cert_hash: str = Field(description="hex SHA-256 of the TLS key's SubjectPublicKeyInfo", pattern="^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _key_id_matches(self) -> SignerKey:
        if pki.key_id_for(decode_public_key(self.public_key)) != self.key_id:
            raise ValueError(f"key id {self.key_id!r} is not the id of its public key")
        return self


class SignerPublic(_Public):
    """A coordinator's or operator's key sets (several during a rotation)."""

    role: Role
    keys: list[SignerKey] = Field(min_length=1)


class CruncherPublic(_Public):
    cruncher_id: str
    public_key: str = Field(description="base64 of the raw Ed25519 public key that signs delegations")
    wallet: str = Field("", description="the same key as a base58 Solana address, when known")

    _check_id = field_validator("cruncher_id")(lambda v: validate_id(v, "cruncher id"))
    _check_key = field_validator("public_key")(lambda v: decode_public_key(v) and v)


def load(model: type[_Public], data: bytes, what: str) -> _Public:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "file"
        raise ConfigError(ErrorCode.PKI_INVALID, f"{what} is not valid public material: {where}: {problem['msg']}") from None
