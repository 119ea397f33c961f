"""What the transport lets a peer cost, on the orchestrator and the runner (SECURITY.md T-1, T-4).

Real servers over TLS on loopback: a runner and a `tests/static_orchestrator.py`
process. Runner floods are in test_attacks.py; the audit log's own rules in test_audit.py.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from secure_runner import pki
from secure_runner.orchestrator.service import WATCH_RPC
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.token import model_id_field
from secure_runner.transport import tls
from secure_runner.v1 import orchestrator_pb2

from conftest import CRUNCH, TESTS, idle_connections, open_file_limit


class OrchestratorProcess:
    """`tests/static_orchestrator.py` serving an empty model list, started with `env` (inherited by default)."""

    def __init__(self, layout: pki.PkiLayout, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        models = tmp_path / "models.json"
        models.write_text("[]")
        command = [sys.executable, str(TESTS / "static_orchestrator.py"), str(layout.root), CRUNCH, str(models), "0",
                   str(tmp_path / "orchestrator-audit.jsonl")]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        self.port = int(line.split()[1]) if line.startswith("READY ") else None

    def stop(self) -> str:
        self.proc.kill()
        return self.proc.communicate(timeout=10)[1]


@pytest.fixture
def orchestrator(layout, tmp_path) -> Iterator[OrchestratorProcess]:
    with open_file_limit(1024):  # the common default: the server must raise it itself
        process = OrchestratorProcess(layout, tmp_path)
    assert process.port, process.stop()
    yield process
    process.stop()


def _coordinator_files(layout: pki.PkiLayout) -> tls.TlsFiles:
    return tls.TlsFiles(layout.coordinator_cert, layout.coordinator_key, layout.ca_cert)


def _handshake(layout: pki.PkiLayout, port: int, version: ssl.TLSVersion) -> str:
    """A TLS handshake of exactly `version` with the coordinator's valid certificate; the version agreed."""
    context = ssl.create_default_context(cafile=str(layout.ca_cert))
    context.load_cert_chain(layout.coordinator_cert, layout.coordinator_key)
    context.check_hostname = False
    context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, context.wrap_socket(sock) as tls_sock:
        return tls_sock.version()


def test_tls_1_2_is_refused_by_runner_and_orchestrator(layout, runners, orchestrator) -> None:
    for port in (runners["counter"].port, orchestrator.port):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            _handshake(layout, port, ssl.TLSVersion.TLSv1_2)
        assert _handshake(layout, port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_a_server_that_could_speak_tls_1_2_refuses_to_start(layout, tmp_path) -> None:
    """grpc imported before secure_runner (TLS 1.3 policy not applied): the server's self-check stops it."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_SSL_CIPHER_SUITES"}
    boot = tmp_path / "grpc_first.py"
    boot.write_text(
        "import grpc, runpy, sys\n"
        f"sys.argv = [{str(TESTS / 'static_orchestrator.py')!r}, *sys.argv[1:]]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    models = tmp_path / "models.json"
    models.write_text("[]")
    done = subprocess.run(
        [sys.executable, str(boot), str(layout.root), CRUNCH, str(models), "0", str(tmp_path / "audit.jsonl")],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode != 0 and "READY" not in done.stdout
    assert "PKI_INVALID" in done.stderr and "accepted a TLSv1.2 handshake" in done.stderr


def test_idle_connections_do_not_stall_the_orchestrator(layout, orchestrator) -> None:
    """2,000 idle and 50 half-open TLS connections: a coordinator's new connection is still answered at once."""
    name = PeerIdentity.make(CRUNCH, Role.ORCHESTRATOR, "orchestrator").tls_server_name
    with idle_connections(orchestrator.port, idle=2000, half_open_tls=50):
        der = tls.fetch_server_certificate("127.0.0.1", orchestrator.port, _coordinator_files(layout), name, timeout=2)
        assert der == tls.pem_to_der(layout.orchestrator_cert.read_bytes())
        with grpc.secure_channel(
            f"127.0.0.1:{orchestrator.port}", tls.channel_credentials(_coordinator_files(layout)),
            options=tls.channel_options(name),
        ) as channel:
            watch = channel.unary_stream(WATCH_RPC, response_deserializer=orchestrator_pb2.ModelList.FromString)
            with pytest.raises(grpc.RpcError) as err:  # no token: refused, and promptly
                next(iter(watch(model_id_field(CRUNCH), timeout=2)))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
