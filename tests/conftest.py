"""Shared fixtures: a real test PKI, real runner processes, a raw coordinator.

Nothing here is mocked: runners are `secure-runner runner` subprocesses with
their own workers, reached over mutual TLS on loopback with signed tokens.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from secure_runner import codec, pki
from secure_runner.client.security import load_signing_key
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.token import issue_call_token
from secure_runner.transport import tls
from secure_runner.transport.status import TOKEN_KEY
from secure_runner.v1 import runner_pb2

TESTS = Path(__file__).resolve().parent
MODELS = TESTS / "models"
BASE_PATH = MODELS / "base"
CRUNCH = "test-crunch"
BASE_CLASS = "sr_testgame.base.GameBase"
SPECS = [
    pki.ModelSpec("counter", "Counter", "alice", "Alice"),
    pki.ModelSpec("async-model", "Async", "bob", "Bob"),
    pki.ModelSpec("no-candidate", "None", "carol", "Carol"),
    pki.ModelSpec("two-candidates", "Two", "carol", "Carol"),
]
SETUP_RPC = "/secure_runner.v1.ModelRunner/Setup"
CALL_RPC = "/secure_runner.v1.ModelRunner/Call"


@pytest.fixture(scope="session")
def layout(tmp_path_factory) -> pki.PkiLayout:
    return pki.make_test_pki(tmp_path_factory.mktemp("pki") / "pki", CRUNCH, SPECS)


@pytest.fixture(scope="session")
def other_layout(tmp_path_factory) -> pki.PkiLayout:
    """Another CA with the very same names: trusted by nobody here."""
    return pki.make_test_pki(tmp_path_factory.mktemp("other") / "pki", CRUNCH, SPECS)


class RunnerProcess:
    """A real `secure-runner runner` subprocess hosting one submission."""

    def __init__(self, layout: pki.PkiLayout, model_id: str, submission: Path | None = None) -> None:
        self.model_id = model_id
        submission = submission or MODELS / "submissions" / model_id
        command = [
            sys.executable, "-m", "secure_runner.cli", "runner",
            "--crunch", CRUNCH,
            "--model", f"{model_id}={submission}",
            "--pki", str(layout.root),
            "--base-path", str(BASE_PATH),
            "--port", "0",
            "--log-level", "INFO",
            "--exit-with-parent",
        ]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"runner did not start: {line!r}")
        self.port = int(line.split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def runners(layout) -> Iterator[dict[str, RunnerProcess]]:
    """One shared runner per model id, started on first use."""
    started: dict[str, RunnerProcess] = {}

    class Lazy(dict):
        def __missing__(self, model_id):
            started[model_id] = RunnerProcess(layout, model_id)
            return started[model_id]

    yield Lazy()
    for runner in started.values():
        runner.stop()


@pytest.fixture
def fresh_runner(layout) -> Iterator:
    """A runner of one's own, for tests that break or restart it."""
    made: list[RunnerProcess] = []

    def make(model_id: str, submission: Path | None = None) -> RunnerProcess:
        made.append(RunnerProcess(layout, model_id, submission))
        return made[-1]

    yield make
    for runner in made:
        runner.stop()


_STUB_METHODS = {
    "echo": "def echo(self, value):\n        return value",
    "count": "def count(self):\n        return 0",
    "hang": "def hang(self, seconds):\n        pass",
    "fail": "def fail(self, message):\n        pass",
}


def write_submission(parent: Path, name: str, methods: dict[str, str], imports: str = "") -> Path:
    """A one-class submission implementing GameBase; `methods` replaces the stubs by name."""
    folder = parent / name
    folder.mkdir()
    bodies = "\n\n".join("    " + (methods.get(n) or stub) for n, stub in _STUB_METHODS.items())
    (folder / "main.py").write_text(
        f"{imports}\nfrom sr_testgame.base import GameBase\n\n\nclass Probe(GameBase):\n{bodies}\n"
    )
    return folder


def credentials(layout: pki.PkiLayout, *, client_cert: bool = True) -> grpc.ChannelCredentials:
    ca = layout.ca_cert.read_bytes()
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return tls.channel_credentials(tls.TlsFiles(layout.coordinator_cert, layout.coordinator_key, layout.ca_cert))


def json_arg(value) -> runner_pb2.values__pb2.Argument:
    return codec.encode_arguments([value], {})[0][0]


class RawCoordinator:
    """Speaks the runner protocol by hand, so tests can forge every part of a call."""

    def __init__(
        self,
        layout: pki.PkiLayout,
        address: str,
        model_id: str,
        *,
        creds: grpc.ChannelCredentials | None = None,
        server_model_id: str | None = None,
    ) -> None:
        self.layout = layout
        self.model_id = model_id
        server_name = PeerIdentity.make(CRUNCH, Role.RUNNER, server_model_id or model_id).tls_server_name
        self.channel = grpc.aio.secure_channel(
            address, creds or credentials(layout), options=tls.channel_options(server_name)
        )
        self.key = load_signing_key(layout.coordinator_identity)
        self.key_id = pki.key_id_for(bytes(self.key.verify_key))
        self.cert_sha256 = tls.cert_sha256(tls.pem_to_der(layout.coordinator_cert.read_bytes()))

    def token(self, body: bytes, rpc: str = CALL_RPC, method: str = "", **overrides) -> bytes:
        fields = dict(
            key_id=self.key_id,
            crunch_id=CRUNCH,
            audience=self.model_id,
            rpc=rpc,
            method=method,
            body=body,
            cert_sha256=self.cert_sha256,
            now=int(time.time()),
        )
        fields.update(overrides)
        key = fields.pop("key", self.key)
        return issue_call_token(key, **fields)

    async def raw(self, rpc: str, body: bytes, metadata=(), timeout: float = 10.0, response_type=None) -> object:
        response_type = response_type or (runner_pb2.SetupResponse if rpc == SETUP_RPC else runner_pb2.CallResponse)
        stub = self.channel.unary_unary(rpc, response_deserializer=response_type.FromString)
        return await stub(body, metadata=metadata, timeout=timeout)

    async def setup(self, base_classname: str = BASE_CLASS, **kwargs) -> runner_pb2.SetupResponse:
        body = runner_pb2.SetupRequest(model_id=self.model_id, base_classname=base_classname).SerializeToString()
        return await self.raw(SETUP_RPC, body, ((TOKEN_KEY, self.token(body, SETUP_RPC)),), **kwargs)

    def call_body(self, method: str, *args) -> bytes:
        arguments, _ = codec.encode_arguments(list(args), {})
        return runner_pb2.CallRequest(model_id=self.model_id, method=method, arguments=arguments).SerializeToString()

    async def call(self, method: str, *args, timeout: float = 10.0) -> runner_pb2.CallResponse:
        body = self.call_body(method, *args)
        return await self.raw(CALL_RPC, body, ((TOKEN_KEY, self.token(body, method=method)),), timeout=timeout)

    async def count(self) -> int:
        response = await self.call("count")
        assert response.status == runner_pb2.CALL_STATUS_SUCCESS, response
        return codec.from_variant(response.output)

    async def close(self) -> None:
        await self.channel.close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # gRPC honours http_proxy; loopback tests must never go through one.
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
