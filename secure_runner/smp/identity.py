"""Identity names: ids, SPIFFE URIs and TLS server names.

Every certificate this system issues carries exactly one URI SAN,
`spiffe://<crunch-id>/<role>/<id>`, and one DNS SAN, `<id>.<role>.<crunch-id>.invalid`.
The URI names the peer for authorization; the DNS name is what a client pins with
`grpc.ssl_target_name_override`, so the TLS handshake itself fails against a
server holding another model's certificate (before any request data is sent).
Ids are restricted to DNS-label characters so both forms are unambiguous.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum

from secure_runner.errors import AuthError, ConfigError, ErrorCode

_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class Role(StrEnum):
    """What a certificate's holder is. A coordinator or operator certificate's id is its signing key's id."""

    COORDINATOR = "coordinator"  # calls a crunch's models, watches its model list, reports failures
    OPERATOR = "operator"  # lists, stops and redeploys a crunch's models (the orchestrator's operator RPCs)
    ORCHESTRATOR = "orchestrator"
    RUNNER = "runner"


SIGNING_ROLES = frozenset({Role.COORDINATOR, Role.OPERATOR})  # roles whose calls carry a signed token


def validate_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a valid id: 1-63 of [a-z0-9-], no leading or trailing '-'."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ConfigError(
            ErrorCode.INVALID_VALUE,
            f"{what} {value!r} must be 1-63 characters of a-z, 0-9 and '-', "
            "not starting or ending with '-'",
        )
    return value


@dataclass(frozen=True)
class PeerIdentity:
    crunch_id: str
    role: Role
    ident: str

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.crunch_id}/{self.role}/{self.ident}"

    @property
    def tls_server_name(self) -> str:
        return f"{self.ident}.{self.role}.{self.crunch_id}.invalid"

    @classmethod
    def make(cls, crunch_id: str, role: Role | str, ident: str) -> PeerIdentity:
        return cls(validate_id(crunch_id, "crunch id"), Role(role), validate_id(ident))

    @classmethod
    def parse(cls, spiffe_id: str) -> PeerIdentity:
        """Parse a SPIFFE id; any deviation from the exact form is PEER_UNAUTHENTICATED."""
        return _parse_spiffe_id(spiffe_id)


@functools.lru_cache(maxsize=1024)
def _parse_spiffe_id(spiffe_id: str) -> PeerIdentity:
    """`PeerIdentity.parse`, once per distinct id: a server reads its peer's id on every call.

    Only valid ids are kept (a refusal raises, and lru_cache keeps no exception), so the
    cache holds ids of certificates the CA issued; bounded all the same.
    """
    prefix = "spiffe://"
    parts = spiffe_id[len(prefix):].split("/") if spiffe_id.startswith(prefix) else []
    try:
        if len(parts) != 3:
            raise ValueError
        return PeerIdentity.make(parts[0], parts[1], parts[2])
    except (ValueError, ConfigError):
        raise AuthError(ErrorCode.PEER_UNAUTHENTICATED, f"not a secure-runner SPIFFE id: {spiffe_id[:200]!r}") from None
