"""What a coordinator needs: its TLS files, its signing key and the registry.

The signing key's id (derived from its public key) must be registered for the
crunch; the coordinator's TLS certificate names the same key id in its SPIFFE
id (servers refuse a token whose key id is not the certificate's: SMP-4a), and
every call token is bound to the SHA-256 of the certificate the channel carrying
it presents (each channel remembers the certificate it was opened with, so a
renewed certificate on disk never breaks the channels still open) and to the
servers that may accept it (their TLS keys). The registry is the coordinator's
own copy of who the crunch's models are: runner identities and the names in
results are taken from it, never from the orchestrator's word. With `chain_config`
that copy is read from the chain (registry.chain) instead of the `registry` file.
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
    chain_config: Path | None = None  # a registry.chain.ChainRegistryConfig JSON file: read the chain, not `registry`

    @classmethod
    def from_pki_dir(cls, root: Path | str) -> CoordinatorSecurity:
        """Use the layout written by `secure-runner pki init`."""
        layout = pki.PkiLayout(Path(root))
        return cls(
            tls=tls.TlsFiles(layout.coordinator_cert, layout.coordinator_key, layout.ca_cert),
            identity_key=layout.coordinator_identity,
            registry=layout.registry,
        )


# Tokens are dated this much in the past: verifiers allow no skew on `iat` (SMP-10), so a
# clock this much ahead of a server's must not make tokens "future". The price: a server that
# started less than this long ago may refuse them (TOKEN_ISSUED_BEFORE_START); Setup retries.
BACKDATE_SECONDS = 0.25


class CallSigner:
    """Signs call tokens with the coordinator's key."""

    def __init__(self, security: CoordinatorSecurity, crunch_id: str) -> None:
        self._key = pki.load_signing_key(security.identity_key)
        self.key_id = pki.key_id_for(bytes(self._key.verify_key))
        self._crunch_id = crunch_id
        self._lifetime = security.token_lifetime_seconds

    def sign(
        self,
        *,
        audience: Sequence[str],
        destinations: Sequence[str],
        cert_sha256: str,
        rpc: str,
        method: str,
        shared_body: bytes,
    ) -> bytes:
        """One token for `model_id_field(m) + shared_body`, for every model m in `audience`.

        `destinations`: the SHA-256 of each accepting server's TLS public key;
        `cert_sha256`: of the certificate presented by the channel that carries it.
        """
        return issue_call_token(
            self._key,
            key_id=self.key_id,
            crunch_id=self._crunch_id,
            audience=audience,
            destinations=sorted(set(destinations)),
            rpc=rpc,
            method=method,
            shared_body=shared_body,
            cert_sha256=cert_sha256,
            now=int(time.time() - BACKDATE_SECONDS),
            lifetime=self._lifetime,
        )
