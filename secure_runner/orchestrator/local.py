"""The embedded orchestrator: one local runner process per submission folder.

Each subfolder of `submissions` is one submission whose folder name is its
model id; only models present in the registry are started (their names and
cruncher come from the registry, never from the untrusted folder). Each runner
gets its own certificate for `spiffe://<crunch>/runner/<model-id>`, listens on
a loopback port of its choosing and reports it on stdout (`READY <port>`).

Standing in for the crunchers, it signs each runner's identity delegation with
the cruncher's identity key from the test PKI. That is the one thing a real
deployment must not copy: there, each cruncher signs its own delegation and the
orchestrator only relays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from nacl.signing import SigningKey

from secure_runner import pki
from secure_runner.orchestrator.service import REPORT_RPC, ModelBoard, OrchestratorServicer
from secure_runner.smp.identity import validate_id
from secure_runner.smp.replay import ReplayCache
from secure_runner.smp.token import issue_delegation
from secure_runner.transport import tls
from secure_runner.transport.audit_log import AuditLog
from secure_runner.transport.registry_file import RegistryFile
from secure_runner.transport.token_auth import TokenAuthInterceptor
from secure_runner.v1 import orchestrator_pb2, orchestrator_pb2_grpc

log = logging.getLogger(__name__)

State = orchestrator_pb2.ModelState


@dataclass(frozen=True)
class LocalOrchestratorSettings:
    crunch_id: str
    submissions: Path
    pki_dir: Path
    base_paths: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    runner_start_timeout: float = 30.0
    runner_log_level: str = "WARNING"
    audit_dir: Path | None = None  # default: an `audit` folder beside the PKI folder
    # Sandbox layers the runners may start without (each runner logs it); empty: all required.
    allow_missing_layers: tuple[str, ...] = ()

    @property
    def audit_folder(self) -> Path:
        return self.audit_dir or self.pki_dir.resolve().parent / "audit"


def discover_submissions(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_dir() and not p.name.startswith((".", "_"))
    }


class LocalOrchestrator:
    def __init__(self, settings: LocalOrchestratorSettings) -> None:
        self.settings = settings
        self.layout = pki.PkiLayout(settings.pki_dir)
        self.board = ModelBoard(validate_id(settings.crunch_id, "crunch id"))
        self._registry = RegistryFile(self.layout.registry)
        settings.audit_folder.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(settings.audit_folder / "orchestrator.jsonl")
        auth = TokenAuthInterceptor(
            settings.crunch_id, [REPORT_RPC], self._registry.current, self.audit, replay=ReplayCache()
        )
        self._server = grpc.aio.server(interceptors=[auth], options=tls.server_options())
        orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(
            OrchestratorServicer(self.board, self._registry.current, self.audit, self.stop_model), self._server
        )
        self._runners: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    async def start(self) -> int:
        files = tls.TlsFiles(self.layout.orchestrator_cert, self.layout.orchestrator_key, self.layout.ca_cert)
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = self._server.add_secure_port(address, tls.reloading_server_credentials(files))
        await self._server.start()
        registry = self._registry.current()
        launches = []
        for model_id, path in discover_submissions(self.settings.submissions).items():
            entry = registry.model(self.settings.crunch_id, model_id)
            if entry is None:
                log.warning("submission %s is not in the registry; not started", path)
                continue
            info = orchestrator_pb2.ModelInfo(
                model_id=model_id,
                model_name=entry.model_name,
                cruncher_id=entry.cruncher_id,
                cruncher_name=entry.cruncher_name,
            )
            launches.append(self._launch(info, path))
        await asyncio.gather(*launches)
        return self.port

    async def _launch(self, info: orchestrator_pb2.ModelInfo, path: Path) -> None:
        info.deployment_id = f"{info.model_id}-{secrets.token_hex(4)}"
        info.state = State.MODEL_STATE_STARTING
        await self.board.put(info)
        cert = pki.issue_runner_certificate(self.layout, info.model_id, crunch_id=self.settings.crunch_id)
        info.runner_delegation = self._sign_delegation(info, cert)
        command = [
            sys.executable, "-m", "secure_runner.cli", "runner",
            "--crunch", self.settings.crunch_id,
            "--model", f"{info.model_id}={path.resolve()}",
            "--pki", str(self.layout.root),
            "--host", self.settings.host,
            "--port", "0",
            "--log-level", self.settings.runner_log_level,
            "--audit-log", str(self.settings.audit_folder / f"runner-{info.model_id}.jsonl"),
            "--exit-with-parent",
        ]
        for base in self.settings.base_paths:
            command += ["--base-path", str(base.resolve())]
        for layer in self.settings.allow_missing_layers:
            command += ["--allow-missing-layer", layer]
        proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        self._runners[info.model_id] = proc
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.settings.runner_start_timeout)
            word, port = line.decode().split()
            if word != "READY":
                raise ValueError(line)
        except (TimeoutError, ValueError):
            log.error("runner for %s did not become ready", info.model_id)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            info.state = State.MODEL_STATE_STOPPED
            await self.board.put(info)
            return
        info.address = f"{self.settings.host}:{int(port)}"
        info.state = State.MODEL_STATE_RUNNING
        await self.board.put(info)
        task = asyncio.create_task(self._watch_exit(info, proc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_exit(self, info: orchestrator_pb2.ModelInfo, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        log.warning("runner for %s exited with %s", info.model_id, code)
        await self._put_state(info, State.MODEL_STATE_STOPPED)

    async def _put_state(self, info: orchestrator_pb2.ModelInfo, state: int) -> None:
        updated = orchestrator_pb2.ModelInfo()
        updated.CopyFrom(info)
        updated.state = state
        await self.board.put(updated)

    def _sign_delegation(self, info: orchestrator_pb2.ModelInfo, cert: x509.Certificate) -> bytes:
        if not info.cruncher_id:
            log.warning("model %s has no cruncher identity; clients will refuse it", info.model_id)
            return b""
        cruncher_key = pki.load_identity_key(self.layout.cruncher_identity(info.cruncher_id))
        return issue_delegation(
            SigningKey(cruncher_key.private_bytes_raw()),
            crunch_id=self.settings.crunch_id,
            model_id=info.model_id,
            spki_sha256=tls.spki_sha256(cert.public_bytes(Encoding.DER)),
            now=int(time.time()),
            lifetime=int((cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()),
        )

    async def stop_model(self, model_id: str, deployment_id: str) -> bool:
        """Stop the runner of `model_id` if `deployment_id` is still its current deployment."""
        info = self.board.get(model_id)
        if info is None or info.deployment_id != deployment_id or info.state != State.MODEL_STATE_RUNNING:
            return False
        with contextlib.suppress(ProcessLookupError):
            self._runners[model_id].terminate()
        await self._put_state(info, State.MODEL_STATE_STOPPED)
        return True

    def runner_process(self, model_id: str) -> asyncio.subprocess.Process:
        return self._runners[model_id]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for proc in self._runners.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self._runners.values():
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await self._server.stop(0.5)
        self.audit.close()
