"""The runner's control channel: the orchestrator stops, redeploys or asks about one hosted model.

A runner started with `--control-socket PATH` (the embedded orchestrator starts every
runner so) listens on that unix socket once it has printed `READY <port>`. A client
sends one command per line and gets one line back for each, in order:

    STOP <model-id>      ->  OK STOP <model-id>      its worker killed, its cgroup removed; calls for
                                                     it refused (MODEL_UNKNOWN); health NOT_SERVING
    REDEPLOY <model-id>  ->  OK REDEPLOY <model-id>  a fresh worker that never saw the model's Setup
    STATUS <node-id>     ->  OK STATUS <node-id> <deployment> <json>
                                                     who this runner is (its node and the deployment id
                                                     it was started as) and each hosted model's state:
                                                     {"<model>": {"state", "code", "message", "since_ms",
                                                     "calls"}} (`RunnerServer.model_status`: its last
                                                     failure; "calls": its call counters,
                                                     runner/call_stats.py)
    anything else        ->  ERROR <code>            logged; the runner serves on

The runner outlives the orchestrator: a closed connection ends nothing, and an
orchestrator that restarts connects again (STATUS tells it this is the runner it
launched). The runner stops on SIGTERM.

Why this is safe:
- Only the orchestrator's host user. The socket lives in a directory the runner
  refuses unless it is owned by the runner's own user and closed to everyone else
  (mode 0700); each connection's peer credentials (SO_PEERCRED) must name that same
  user, or it is refused and audited. Workers run as other users, in their own
  namespaces, under Landlock, and inherit no descriptor but their pipes (W-1, W-6,
  W-7): they can neither reach the directory nor pass the credential check. No
  network peer can send a command: it is not a network socket.
- Little power. A command names a model the runner already hosts and can only
  take it away or restart its worker, or read states: no path, code, limit or key.
  The orchestrator could do as much by killing the runner.
- Strict input. A line is at most MAX_LINE bytes (a longer one is dropped whole)
  and must be ASCII `VERB ID` with a known verb and an id that passes
  `validate_id` (a hosted model; for STATUS, this node). Anything else is answered
  `ERROR <code>` and logged, never raised; no answer echoes its input. One command
  runs at a time, whatever the number of connections.
- Audited. Every command carried out, and every refusal, is a line of the runner's
  hash-chained audit log (a refusal without the line it refused); STATUS, a read,
  is not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path

from secure_runner.errors import AuthError, ConfigError, ErrorCode, RequestError, SecureRunnerError
from secure_runner.runner.call_stats import CallStats
from secure_runner.runner.server import RunnerServer, host_of
from secure_runner.runner.supervisor import ModelStatus
from secure_runner.smp.identity import validate_id

log = logging.getLogger(__name__)

MAX_LINE = 128  # bytes: a verb, a space and a model id (at most 63 characters) fit with room to spare
READ_SIZE = 4096
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
COMMANDS = {"STOP": RunnerServer.retire, "REDEPLOY": RunnerServer.redeploy}
AUDIT_WHO = "orchestrator (control socket)"  # the audit log's `who` for commands; refusals never log the input
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def check_private_directory(folder: Path) -> None:
    """ConfigError unless `folder` is a real directory owned by this user and closed to everyone else."""
    try:
        info = os.lstat(folder)
    except OSError as exc:
        raise ConfigError(ErrorCode.INVALID_VALUE, f"control directory {folder}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise ConfigError(
            ErrorCode.INVALID_VALUE, f"control directory {folder} must be a directory of uid {os.geteuid()}, mode 0700"
        )


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(ErrorCode.INVALID_VALUE, f"control socket path is over {MAX_SOCKET_PATH} bytes: {path}")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket, as the kernel recorded them."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


class ControlChannel:
    """The control socket of one runner."""

    def __init__(self, server: RunnerServer, path: Path, deployment: str) -> None:
        check_socket_path(path)
        check_private_directory(path.parent)
        self._server = server
        self._path = path
        self._deployment = validate_id(deployment, "deployment id")
        self._one_at_a_time = asyncio.Lock()
        self._listener: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen (before the runner says READY, so the orchestrator finds the socket there).

        A client leaving ends nothing: the runner stops on SIGTERM, then `close`.
        """
        if self._path.is_socket():  # left by an earlier runner of this node: the directory is ours alone
            self._path.unlink()
        self._listener = await asyncio.start_unix_server(self._client, path=str(self._path))
        os.chmod(self._path, 0o600)

    def close(self) -> None:
        self._listener.close()
        self._path.unlink(missing_ok=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _pid, uid, _gid = peer_credentials(writer.get_extra_info("socket"))
            if uid != os.geteuid():
                error = AuthError(ErrorCode.PEER_UNAUTHENTICATED, f"control connection from uid {uid}")
                log.warning("control connection refused: %s", error)
                self._server.decisions.deny(error.code, f"uid {uid}", {"rpc": "control"})
                return
            async for line in _lines(reader):
                async with self._one_at_a_time:
                    answer = await self._run(line)
                writer.write(answer.encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _run(self, line: bytes | None) -> str:
        """Carry out one command line; its answer line. Both are in the runner's audit log (STATUS is not)."""
        try:
            verb, ident = _parse(line)
            if verb == "STATUS":
                return self._status(ident)
            host_of(self._server.hosts, ident)  # MODEL_UNKNOWN unless hosted
            await COMMANDS[verb](self._server, ident)
        except SecureRunnerError as exc:
            log.warning("control command refused: %s", exc)
            self._server.decisions.deny(exc.code, AUDIT_WHO, {"rpc": "control"})
            return f"ERROR {exc.code}"
        log.info("control: %s %s done", verb, ident)
        self._server.decisions.allow(AUDIT_WHO, {"rpc": "control", "command": verb, "model": ident})
        return f"OK {verb} {ident}"

    def _status(self, node_id: str) -> str:
        if node_id != self._server.settings.node_id:
            raise RequestError(ErrorCode.MODEL_UNKNOWN, "not this node")
        states = {model_id: status_fields(status, self._server.hosts[model_id].stats)
                  for model_id, status in self._server.model_status().items()}
        return f"OK STATUS {node_id} {self._deployment} {json.dumps(states, separators=(',', ':'))}"


def status_fields(status: ModelStatus, stats: CallStats) -> dict:
    """A hosted model's status and call counters as the STATUS answer carries them."""
    return {"state": str(status.state), "code": status.failure_code, "message": status.failure_message[:500],
            "since_ms": int(status.since * 1000), "calls": stats.fields()}


async def _lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes | None]:
    """Each line without its newline, or None for a line over MAX_LINE bytes; ends at end of file."""
    buffer, overlong = bytearray(), False
    while chunk := await reader.read(READ_SIZE):
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            yield None if overlong or end > MAX_LINE else bytes(buffer[:end])
            del buffer[: end + 1]
            overlong = False
        if len(buffer) > MAX_LINE:  # no newline in sight: drop what came, and the rest up to the next one
            buffer.clear()
            overlong = True


def _parse(line: bytes | None) -> tuple[str, str]:
    if line is None:
        raise RequestError(ErrorCode.MALFORMED_REQUEST, f"a line over {MAX_LINE} bytes")
    verb, _, ident = line.decode("ascii", "replace").partition(" ")
    if verb not in (*COMMANDS, "STATUS"):
        raise RequestError(ErrorCode.MALFORMED_REQUEST, f"not a command: {line!r}")
    return verb, validate_id(ident, "model id")
