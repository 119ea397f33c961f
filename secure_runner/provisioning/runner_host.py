"""The runner host's keys: every TLS key its orchestrator and runners use is made on this host, and stays here.

The host folder is laid out like a `pki init` folder minus everything that is not the
host's (no `ca.key`, no `crunchers/`), so `secure-runner orchestrator --credentials
production --pki HOME` and the runners it starts use it as is:

    HOME/ca.crt, HOME/registry.json            public, from the operator
    HOME/orchestrator/tls.key, tls.csr, tls.crt
    HOME/runners/<node id>/tls.key, tls.csr, tls.crt
    HOME/delegations/<model id>.delegation     signed by each model's cruncher; only relayed

The operator signs the CSRs (`secure-runner pki ca sign --role runner --id <node id>`),
each model's cruncher signs a delegation for its runner's certificate or CSR
(`secure-runner pki cruncher delegate`), and the host installs both.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_runner import pki
from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.provisioning import ca, certs
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.token import MAX_DELEGATION_BYTES


@dataclass(frozen=True)
class HostHome:
    """A runner host's folder; see the module docstring. Shares the paths of `pki.PkiLayout`."""

    root: Path

    @property
    def layout(self) -> pki.PkiLayout:
        return pki.PkiLayout(self.root)

    def tls_dir(self, identity: PeerIdentity) -> Path:
        if identity.role is Role.ORCHESTRATOR:
            return self.layout.orchestrator_dir
        if identity.role is Role.RUNNER:
            return self.layout.runner_dir(identity.ident)
        raise ConfigError(ErrorCode.CERT_NOT_ISSUED_FOR_US, f"a runner host holds no {identity.role} certificates")

    def delegation(self, model_id: str) -> Path:
        return self.root / "delegations" / f"{pki.validate_id(model_id, 'model id')}.delegation"

    def request(self, identity: PeerIdentity) -> Path:
        """Make the TLS key and the CSR for `identity` here; return the CSR's path (what the operator signs)."""
        folder = self.tls_dir(identity)
        if (folder / "tls.key").exists():
            raise ConfigError(ErrorCode.PKI_INVALID, f"{folder} already holds a TLS key")
        key = certs.generate_tls_key()
        pki.write_private_key(folder / "tls.key", key)
        pki.write_public_file(folder / "tls.csr", certs.make_csr(key, identity).public_bytes(Encoding.PEM),
                              "certificate signing request")
        return folder / "tls.csr"

    def install(self, cert: x509.Certificate, ca_cert: x509.Certificate, registry: bytes | None = None) -> Path:
        """Check a signed certificate against the CA, its identity and our key for it; then install it."""
        identity = certs.identity_of(cert)
        if identity.crunch_id != ca.crunch_of(ca_cert):
            raise ConfigError(ErrorCode.CERT_NOT_ISSUED_FOR_US, f"{identity.spiffe_id} is not of the CA's crunch")
        folder = self.tls_dir(identity)
        certs.verify_leaf(cert, ca_cert, identity, key=pki.load_private_key(folder / "tls.key"))  # type: ignore[arg-type]
        pki.write_certificate(self.layout.ca_cert, ca_cert)
        if registry is not None:
            pki.write_registry(self.layout.registry, registry)
        pki.write_certificate(folder / "tls.crt", cert)
        return folder / "tls.crt"

    def add_delegation(self, model_id: str, token: bytes) -> Path:
        """Keep a cruncher's delegation for the orchestrator to relay (it is verified when a runner starts)."""
        if not token or len(token) > MAX_DELEGATION_BYTES:
            raise ConfigError(ErrorCode.PKI_INVALID, f"a delegation is 1..{MAX_DELEGATION_BYTES} bytes")
        path = self.delegation(model_id)
        pki.write_public_file(path, token, f"delegation of model {model_id}, from its cruncher")
        return path


# --------------------------------------------------------------------------- CLI: secure-runner pki runner-host ...


def add_commands(group: argparse._SubParsersAction) -> None:
    parser = group.add_parser(
        "runner-host", help="runner host: make runner and orchestrator TLS keys and CSRs here, install certificates "
        "and delegations",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=type(parser))
    init = verbs.add_parser("init", help="make TLS keys and CSRs: one per --node, and --orchestrator")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--crunch", required=True, metavar="ID")
    init.add_argument("--node", action="append", default=[], metavar="NODE_ID",
                      help="a runner's node id (its model id when it hosts one model); repeatable")
    init.add_argument("--orchestrator", action="store_true", help="the orchestrator's own TLS key and CSR too")
    init.set_defaults(func=_init)
    install = verbs.add_parser("install", help="check and install certificates the operator signed")
    install.add_argument("--dir", type=Path, required=True)
    install.add_argument("--cert", type=Path, action="append", required=True, help="repeatable")
    install.add_argument("--ca", type=Path, required=True)
    install.add_argument("--registry", type=Path, help="the crunch's registry file, installed beside it")
    install.set_defaults(func=_install)
    delegation = verbs.add_parser("add-delegation", help="keep a cruncher's delegation for the orchestrator to relay")
    delegation.add_argument("--dir", type=Path, required=True)
    delegation.add_argument("--model", required=True, metavar="MODEL_ID")
    delegation.add_argument("file", type=Path)
    delegation.set_defaults(func=_add_delegation)


def _init(args: argparse.Namespace) -> int:
    home = HostHome(args.dir)
    identities = [PeerIdentity.make(args.crunch, Role.RUNNER, node) for node in args.node]
    if args.orchestrator:
        identities.append(PeerIdentity.make(args.crunch, Role.ORCHESTRATOR, pki.ORCHESTRATOR_ID))
    if not identities:
        raise ConfigError(ErrorCode.PKI_INVALID, "nothing to make: give --node and/or --orchestrator")
    for identity in identities:
        print(f"{identity.spiffe_id}: send {home.request(identity)} to the crunch operator")
    return 0


def _install(args: argparse.Namespace) -> int:
    home, ca_cert = HostHome(args.dir), pki.load_certificate(args.ca)
    registry = pki.read_file(args.registry, "registry") if args.registry else None
    for path in args.cert:
        print(f"installed {home.install(pki.load_certificate(path), ca_cert, registry)}")
    return 0


def _add_delegation(args: argparse.Namespace) -> int:
    print(f"installed {HostHome(args.dir).add_delegation(args.model, pki.read_file(args.file, 'delegation'))}")
    return 0
