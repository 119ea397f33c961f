"""Where the embedded orchestrator gets each runner's certificate and delegation: two modes, chosen by configuration.

* `test-pki` (the demo, the tests): the orchestrator holds the test PKI's CA key and
  every cruncher's identity key; it issues each node's runner certificate itself and
  signs each model's delegation with its cruncher's key. Labelled as such in `--help`
  and in the log at start, because a deployment must not do this.
* `production`: the orchestrator holds no CA key and no cruncher key, and refuses a
  folder that does. The runner host made each runner's TLS key and CSR, the operator
  signed it, the host installed the certificate (`secure-runner pki runner-host ...`);
  each cruncher signed its model's delegation, which the host installed in
  `delegations/`. The orchestrator checks what it relays before starting a runner
  (the certificate path-validated against the crunch CA for the node's identity and
  key; the delegation against the registry with the same rule clients apply,
  SMP-30..35), so a missing or wrong file is a clear RUNNER_FAILED on the board
  rather than a runner every client refuses. Node ids must be known in advance
  (one certificate per node), so use `models_per_node=1` (node id = model id) or
  provision `node-N` ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal, Protocol

from cryptography import x509

from secure_runner import pki
from secure_runner.errors import ConfigError, ErrorCode, SecureRunnerError
from secure_runner.orchestrator.launcher import LauncherError
from secure_runner.provisioning import certs
from secure_runner.provisioning.runner_host import HostHome
from secure_runner.registry.delegation import verify_runner_delegation
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.registry import RegistrySnapshot
from secure_runner.smp.token import issue_delegation
from secure_runner.v1 import orchestrator_pb2

log = logging.getLogger(__name__)

CredentialsMode = Literal["test-pki", "production"]
CREDENTIALS_MODES: tuple[CredentialsMode, ...] = ("test-pki", "production")


class RunnerCredentials(Protocol):
    def issue(self, node_id: str) -> x509.Certificate: ...  # the node's certificate, ready on disk
    def delegation(self, info: orchestrator_pb2.ModelInfo, cert: x509.Certificate) -> bytes: ...


def sign_delegation(
    layout: pki.PkiLayout, crunch_id: str, info: orchestrator_pb2.ModelInfo, cert: x509.Certificate
) -> bytes:
    """The cruncher's delegation of `info`'s model to the TLS key of `cert`, signed with its key from `layout`."""
    if not info.cruncher_id:
        log.warning("model %s has no cruncher identity; clients will refuse it", info.model_id)
        return b""
    return issue_delegation(
        pki.load_signing_key(layout.cruncher_identity(info.cruncher_id)),
        crunch_id=crunch_id,
        model_id=info.model_id,
        spki_sha256=certs.spki_sha256_b64url(cert.public_key()),
        now=int(time.time()),
        lifetime=int((cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()),
    )


class EmbeddedCredentials:
    """TEST PKI mode: issues a node's runner certificate into the PKI folder and signs its models' delegations."""

    def __init__(self, layout: pki.PkiLayout, crunch_id: str) -> None:
        self._layout = layout
        self._crunch_id = crunch_id

    def issue(self, node_id: str) -> x509.Certificate:
        return pki.issue_runner_certificate(self._layout, node_id, crunch_id=self._crunch_id)

    def delegation(self, info: orchestrator_pb2.ModelInfo, cert: x509.Certificate) -> bytes:
        return sign_delegation(self._layout, self._crunch_id, info, cert)


class ProvisionedCredentials:
    """Production mode: relays the runner host's installed certificates and the crunchers' delegations, after checking them."""

    def __init__(self, layout: pki.PkiLayout, crunch_id: str, registry: Callable[[], RegistrySnapshot]) -> None:
        held = [path for path in (layout.ca_key, layout.crunchers_dir) if path.exists()]
        if held:
            raise ConfigError(
                ErrorCode.PKI_INVALID,
                f"production mode refuses a folder holding {', '.join(map(str, held))}: the CA key stays with the "
                "crunch operator and each cruncher keeps its own key (that folder is a test PKI: --credentials test-pki)",
            )
        self._home = HostHome(layout.root)
        self._crunch_id = crunch_id
        self._registry = registry

    def issue(self, node_id: str) -> x509.Certificate:
        layout = self._home.layout
        identity = PeerIdentity.make(self._crunch_id, Role.RUNNER, node_id)
        try:
            cert = pki.load_certificate(layout.runner_cert(node_id))
            key = pki.load_private_key(layout.runner_key(node_id))
            certs.verify_leaf(cert, pki.load_certificate(layout.ca_cert), identity, key=key)  # type: ignore[arg-type]
        except ConfigError as exc:
            raise LauncherError(
                f"node {node_id}: no usable runner certificate ({exc.code}: {exc.message}); on the runner host run "
                f"`secure-runner pki runner-host init --node {node_id}`, have the operator sign the CSR, then "
                "`secure-runner pki runner-host install`"
            ) from None
        return cert

    def delegation(self, info: orchestrator_pb2.ModelInfo, cert: x509.Certificate) -> bytes:
        path = self._home.delegation(info.model_id)
        try:
            token = pki.read_file(path, "delegation")
            verify_runner_delegation(
                token, registry=self._registry(), crunch_id=self._crunch_id, model_id=info.model_id,
                presented_spki_sha256=certs.spki_sha256_b64url(cert.public_key()), now=int(time.time()),
            )  # fmt: skip
        except SecureRunnerError as exc:
            raise LauncherError(
                f"model {info.model_id}: no usable delegation in {path} ({exc.code}: {exc.message}); its cruncher "
                "signs one with `secure-runner pki cruncher delegate --runner-cert ...`"
            ) from None
        return token


def credentials_for(
    mode: CredentialsMode, layout: pki.PkiLayout, crunch_id: str, registry: Callable[[], RegistrySnapshot]
) -> RunnerCredentials:
    """The credentials of `mode`, announced in the log (the test-PKI mode as a warning)."""
    if mode == "production":
        credentials = ProvisionedCredentials(layout, crunch_id, registry)
        log.info("credentials: production mode: runner certificates and crunchers' delegations installed in %s "
                 "are relayed; this orchestrator holds no CA key and no cruncher key", layout.root)
        return credentials
    if mode != "test-pki":
        raise ConfigError(ErrorCode.INVALID_VALUE, f"credentials mode must be one of {CREDENTIALS_MODES}, got {mode!r}")
    log.warning("credentials: TEST PKI mode (demo and tests only): this orchestrator issues runner certificates with "
                "the crunch CA key and signs delegations with the crunchers' keys in %s", layout.root)
    return EmbeddedCredentials(layout, crunch_id)
