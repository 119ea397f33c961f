"""Shared fixtures: a real test PKI, real runner processes, a raw coordinator.

Nothing here is mocked: runners are `secure-runner runner` subprocesses with
their own workers, reached over mutual TLS on loopback with signed tokens.
"""

from __future__ import annotations

import secure_runner  # noqa: F401  before grpc: TLS 1.3 only in this process too (SECURITY.md T-1)

import asyncio
import contextlib
import json
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secure_runner import codec, pki
from secure_runner.client.concurrent_runner import DynamicSubclassModelConcurrentRunner
from secure_runner.client.security import CoordinatorSecurity
from secure_runner.pki import load_signing_key
from secure_runner.orchestrator.local import LocalOrchestrator, LocalOrchestratorSettings
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.smp.token import issue_call_token, model_id_field, split_model_id
from secure_runner.transport import tls
from secure_runner.transport.status import TOKEN_KEY, reason_of
from secure_runner.v1 import runner_pb2, values_pb2

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
    """A real `secure-runner runner` subprocess hosting one submission.

    With `control`, the test holds the runner's control socket (`--control-socket`): see `command`.
    """

    def __init__(
        self, layout: pki.PkiLayout, model_id: str, submission: Path | None = None, *extra_args: str,
        control: bool = False,
    ) -> None:
        self.model_id = model_id
        self.audit_log = layout.root.parent / f"audit-{model_id}-{time.monotonic_ns()}.jsonl"
        submission = submission or MODELS / "submissions" / model_id
        command = [
            sys.executable, "-m", "secure_runner.cli", "runner",
            "--crunch", CRUNCH,
            "--model", f"{model_id}={submission}",
            "--pki", str(layout.root),
            "--base-path", str(BASE_PATH),
            "--port", "0",
            "--log-level", "INFO",
            "--audit-log", str(self.audit_log),
            "--exit-with-parent",
            *extra_args,
        ]
        self.control_socket = None
        if control:  # a private directory of this user, as the runner demands (mkdtemp makes it 0700)
            self.control_socket = Path(tempfile.mkdtemp(prefix="sr-ctl-")) / "control.sock"
            command += ["--control-socket", str(self.control_socket), "--deployment", "test-deployment"]
        self._control: socket.socket | None = None
        self.started_at = time.time()
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"runner did not start: {line!r}")
        words = line.split()
        self.port = int(words[1])
        self.metrics_port = int(words[2].removeprefix("metrics=")) if len(words) > 2 else None  # --metrics-port
        self.address = f"127.0.0.1:{self.port}"

    def command(self, line: bytes) -> str:
        """Write one raw line on the runner's control socket (one connection for all); its answer line."""
        if self._control is None:
            self._control = socket.socket(socket.AF_UNIX)
            self._control.connect(str(self.control_socket))
            self._control.settimeout(30)
            self._answers = self._control.makefile("rb")
        self._control.sendall(line + b"\n")
        return self._answers.readline().decode().rstrip("\n")

    def audit_entries(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def close_control(self) -> None:
        if self._control is not None:
            self._answers.close()
            self._control.close()
            self._control = None

    def stop(self) -> None:
        self.close_control()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.control_socket is not None:
            shutil.rmtree(self.control_socket.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def runners(layout) -> Iterator[dict[str, RunnerProcess]]:
    """One shared runner per model id, started on first use."""
    class Lazy(dict):
        def __missing__(self, model_id):
            self[model_id] = RunnerProcess(layout, model_id)
            return self[model_id]

    started = Lazy()
    yield started
    for runner in started.values():
        runner.stop()


@pytest.fixture
def fresh_runner(layout) -> Iterator:
    """A runner of one's own, for tests that break or restart it."""
    made: list[RunnerProcess] = []

    def make(model_id: str, submission: Path | None = None, *extra_args: str) -> RunnerProcess:
        made.append(RunnerProcess(layout, model_id, submission, *extra_args))
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
        self.server_cert = layout.runner_cert(server_model_id or model_id)

    @property
    def destination(self) -> str:
        """What tokens for the runner name as their destination (`dst`): the SHA-256 of its TLS key."""
        return tls.spki_sha256(tls.pem_to_der(self.server_cert.read_bytes()))

    def token(self, body: bytes, rpc: str = CALL_RPC, method: str = "", **overrides) -> bytes:
        """A token for `body` (a whole request in the signed form: model id field first)."""
        split = split_model_id(body)
        fields = dict(
            key_id=self.key_id,
            crunch_id=CRUNCH,
            audience=[self.model_id],
            destinations=[self.destination],  # the runner's TLS key
            rpc=rpc,
            method=method,
            shared_body=split[1] if split else body,
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
        body = model_id_field(self.model_id) + runner_pb2.SetupRequest(base_classname=base_classname).SerializeToString()
        return await self.raw(SETUP_RPC, body, ((TOKEN_KEY, self.token(body, SETUP_RPC)),), **kwargs)

    def call_body(self, method: str, *args) -> bytes:
        arguments, _ = codec.encode_arguments(list(args), {})
        shared = runner_pb2.CallRequest(method=method, arguments=arguments).SerializeToString()
        return model_id_field(self.model_id) + shared

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


async def assert_refused(call, status: grpc.StatusCode, reason: str | None, audited_by=None) -> None:
    """The call fails with `status` and reason code; `audited_by` (a runner) logged the denial last."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == status, err.value.details()
    assert reason_of(err.value) == reason
    if reason:
        assert err.value.details().startswith(f"{reason}: ")
        assert "Traceback" not in err.value.details()
    if audited_by is not None:
        last = audited_by.audit_entries()[-1]
        assert (last["decision"], last["code"]) == ("deny", reason), last


def forge_certificate(
    layout: pki.PkiLayout,
    *,
    uris: list[str],
    dns: list[str] = (),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[bytes, bytes]:
    """A certificate signed by the layout's real CA but with whatever SANs and validity a test needs."""
    ca_cert, ca_key = pki.load_certificate(layout.ca_cert), pki.load_private_key(layout.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=5))
        .not_valid_after(not_after or now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, pki.signature_hash(ca_key))
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def forged_credentials(layout: pki.PkiLayout, cert_pem: bytes, key_pem: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(layout.ca_cert.read_bytes(), key_pem, cert_pem)


CLIENT_DEFAULTS = {"timeout": 5.0, "crunch_id": CRUNCH, "host": "127.0.0.1", "base_classname": BASE_CLASS,
                   "max_consecutive_failures": 3, "max_consecutive_timeouts": 3}


def make_client(layout: pki.PkiLayout, port: int, **overrides) -> DynamicSubclassModelConcurrentRunner:
    """The coordinator's client for the test game, with the layout's coordinator credentials."""
    security = CoordinatorSecurity.from_pki_dir(layout.root)
    return DynamicSubclassModelConcurrentRunner(**{**CLIENT_DEFAULTS, "port": port, "security": security, **overrides})


def json_args(*values) -> list[values_pb2.Argument]:
    """Positional JSON arguments, built the way coordinator code builds them."""
    return [
        values_pb2.Argument(
            position=i,
            data=values_pb2.Variant(type=values_pb2.VariantType.JSON, value=codec.encode_data(values_pb2.VariantType.JSON, value)),
        )
        for i, value in enumerate(values, start=1)
    ]


def free_port() -> int:
    """A loopback port free now: for a server that must come back on the same port (an orchestrator restart)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_pki(tmp_path: Path, *model_ids: str) -> pki.PkiLayout:
    """A PKI of the test's own (the orchestrator issues runner certificates into it)."""
    specs = [pki.ModelSpec(m, m.title(), f"cruncher-{i}", f"Cruncher {i}") for i, m in enumerate(model_ids)]
    return pki.make_test_pki(tmp_path / "pki", CRUNCH, specs)


@contextlib.asynccontextmanager
async def orchestrating(layout: pki.PkiLayout, tmp_path: Path, models: dict[str, Path], **settings):
    """An in-process LocalOrchestrator running one real runner process per entry of `models`."""
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    for model_id, path in models.items():
        (submissions / model_id).symlink_to(path)
    orchestrator = LocalOrchestrator(
        LocalOrchestratorSettings(
            crunch_id=CRUNCH, submissions=submissions, pki_dir=layout.root, base_paths=[BASE_PATH], **settings
        )
    )
    await orchestrator.start()
    try:
        yield orchestrator
    finally:
        await orchestrator.stop()


@contextlib.asynccontextmanager
async def connected(layout: pki.PkiLayout, port: int, *, sync: bool = True, **overrides):
    client = make_client(layout, port, **overrides)
    await client.init()
    task = asyncio.create_task(client.sync()) if sync else None
    try:
        yield client
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def eventually(condition, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def by_id(results) -> dict:
    return {model.model_id: result for model, result in results.items()}


@contextlib.contextmanager
def open_file_limit(soft: int) -> Iterator[None]:
    """This process's soft limit on open files set to `soft` (at most the hard limit) inside the block.

    Child processes inherit it: a server started inside the block starts with it.
    """
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))


# The start of a TLS record announcing a 512-byte ClientHello, of which only these bytes ever come.
_PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(16)


@contextlib.contextmanager
def idle_connections(port: int, idle: int, half_open_tls: int) -> Iterator[list[socket.socket]]:
    """Hold `idle` TCP connections that never send a byte and `half_open_tls` stuck inside a ClientHello.

    Raises this process's open-file limit to hold them; the sockets are closed when the block ends.
    """
    sockets: list[socket.socket] = []
    needed = max(idle + half_open_tls + 1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    with open_file_limit(needed), contextlib.ExitStack() as stack:
        for _ in range(half_open_tls):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            sock.sendall(_PARTIAL_CLIENT_HELLO)
            sockets.append(sock)
        for _ in range(idle):  # non-blocking: a server that stopped accepting cannot stall the test here
            sock = stack.enter_context(socket.socket())
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            sockets.append(sock)
        yield sockets


@contextlib.contextmanager
def orchestrator_process(layout: pki.PkiLayout, submissions: Path, *extra: str) -> Iterator[int]:
    """`secure-runner orchestrator` as a real process on a free port; yields the port; its runners end with it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "secure_runner.cli", "orchestrator", "--crunch", CRUNCH, "--submissions",
         str(submissions), "--pki", str(layout.root), "--base-path", str(BASE_PATH), "--log-level", "WARNING",
         "--stop-models-on-exit", "--port", "0", *extra],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        yield int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(30)
