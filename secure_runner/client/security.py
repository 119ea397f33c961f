"""What a coordinator needs: its TLS files, its signing key and the registry.

The signing key's id (derived from its public key) must be registered for the
crunch; the coordinator's TLS certificate names the same key id in its SPIFFE
id, and every call token is bound to that certificate's SHA-256. The registry
is the coordinator's own copy of who the crunch's models are: runner identities
are checked against it, never against the orchestrator's word.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from secure_runner import pki
from secure_runner.smp.token import issue_call_token
from secure_runner.transport import tls


@dataclass(frozen=True)
class CoordinatorSecurity:
    """A coordinator's credentials: mTLS files, the Ed25519 call-signing key and its copy of the registry."""

    tls: tls.TlsFiles
    identity_key: Path
    registry: Path
    token_lifetime_seconds: int = 30

    @classmethod
    def from_pki_dir(cls, root: Path | str) -> CoordinatorSecurity:
        """Use the layout written by `secure-runner pki init`."""
        layout = pki.PkiLayout(Path(root))
        return cls(
            tls=tls.TlsFiles(layout.coordinator_cert, layout.coordinator_key, layout.ca_cert),
            identity_key=layout.coordinator_identity,
            registry=layout.registry,
        )


class CallSigner:
    """Signs call tokens with the coordinator's key, bound to its TLS certificate."""

    def __init__(self, security: CoordinatorSecurity, crunch_id: str) -> None:
        self._key = pki.load_signing_key(security.identity_key)
        self.key_id = pki.key_id_for(bytes(self._key.verify_key))
        cert_pem, _, _ = security.tls.read()
        self._cert_sha256 = tls.cert_sha256(tls.pem_to_der(cert_pem))
        self._crunch_id = crunch_id
        self._lifetime = security.token_lifetime_seconds

    def sign(self, *, audience: Sequence[str], rpc: str, method: str, shared_body: bytes) -> bytes:
        """One token for `model_id_field(m) + shared_body`, for every model m in `audience`."""
        return issue_call_token(
            self._key,
            key_id=self.key_id,
            crunch_id=self._crunch_id,
            audience=audience,
            rpc=rpc,
            method=method,
            shared_body=shared_body,
            cert_sha256=self._cert_sha256,
            now=int(time.time()),
            lifetime=self._lifetime,
        )
