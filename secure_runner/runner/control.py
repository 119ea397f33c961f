"""The runner's control channel: the process that started it stops or redeploys one hosted model.

A runner started with `--control-stdin` (the embedded orchestrator starts every
runner so) reads one command per line on its stdin once it has printed
`READY <port>`, and answers each line with one line on its stdout, in order:

    STOP <model-id>      ->  OK STOP <model-id>      its worker killed, its cgroup removed; calls for
                                                     it refused (MODEL_UNKNOWN); health NOT_SERVING
    REDEPLOY <model-id>  ->  OK REDEPLOY <model-id>  a fresh worker that never saw the model's Setup
    anything else        ->  ERROR <code>            logged; the runner serves on

End of file on stdin means the parent is gone: the runner shuts down.

Why this is safe:
- No network surface. Commands come only through the stdin pipe the parent made
  when it started the runner, and only the parent holds its write end: workers
  get pipes of their own for fds 0-2 and inherit no other descriptor (W-1), and
  cannot reach the runner's /proc (W-6, W-7). No coordinator or other network
  peer can send a command.
- Little power. A command names a model the runner already hosts and can only
  take it away or restart its worker: no path, code, limit or key. The parent
  could do as much by killing the runner.
- Strict input. A line is at most MAX_LINE bytes (a longer one is dropped whole)
  and must be ASCII `VERB MODEL-ID` with a known verb and an id that passes
  `validate_id` and is hosted. Anything else is answered `ERROR <code>` and
  logged, never raised; no answer echoes its input. One command runs at a time.
- Audited. Every command carried out, and every refusal, is a line of the runner's
  hash-chained audit log (a refusal without the line it refused).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator

from secure_runner.errors import ErrorCode, RequestError, SecureRunnerError
from secure_runner.runner.server import RunnerServer, host_of
from secure_runner.smp.identity import validate_id

log = logging.getLogger(__name__)

MAX_LINE = 128  # bytes: a verb, a space and a model id (at most 63 characters) fit with room to spare
READ_SIZE = 4096
COMMANDS = {"STOP": RunnerServer.retire, "REDEPLOY": RunnerServer.redeploy}
AUDIT_WHO = "parent (control pipe)"  # the audit log's `who` for commands; refusals never log the input


async def serve(server: RunnerServer) -> None:
    """Answer the commands on stdin until end of file."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        async for line in _lines(reader):
            print(await _run(server, line), flush=True)
    finally:
        transport.close()
    log.warning("control channel closed: the parent is gone; shutting down")


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


async def _run(server: RunnerServer, line: bytes | None) -> str:
    """Carry out one command line; its answer line. Both are in the runner's audit log."""
    try:
        verb, model_id = _parse(line)
        host_of(server.hosts, model_id)  # MODEL_UNKNOWN unless hosted
        await COMMANDS[verb](server, model_id)
    except SecureRunnerError as exc:
        log.warning("control command refused: %s", exc)
        server.audit.record(decision="deny", code=exc.code, who=AUDIT_WHO, what={"rpc": "control"})
        return f"ERROR {exc.code}"
    log.info("control: %s %s done", verb, model_id)
    server.audit.record(decision="allow", code="OK", who=AUDIT_WHO, what={"rpc": "control", "command": verb,
                                                                        "model": model_id})
    return f"OK {verb} {model_id}"


def _parse(line: bytes | None) -> tuple[str, str]:
    if line is None:
        raise RequestError(ErrorCode.MALFORMED_REQUEST, f"a line over {MAX_LINE} bytes")
    verb, _, model_id = line.decode("ascii", "replace").partition(" ")
    if verb not in COMMANDS:
        raise RequestError(ErrorCode.MALFORMED_REQUEST, f"not a command: {line!r}")
    return verb, validate_id(model_id, "model id")
