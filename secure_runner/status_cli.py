"""`secure-runner status`: which of a crunch's models are up, and how their last calls went.

    secure-runner status --crunch ID --pki DIR [--as operator|coordinator] [--host H] [--port P]
                         [--interval SECONDS] [--watch] [--json]

Sources. With operator credentials (the default, `--as operator`) it calls the
orchestrator's Operator service (ListModels) every `--interval` seconds: each
model's state, node, deployment, restarts and last failure from the orchestrator's
board, and the runner's own call counters (calls, failed calls, the last call's
status and latency, the last failure's code and message; runner/call_stats.py),
which the orchestrator polls from each runner every few seconds. With a
coordinator's credentials (`--as coordinator`) it reads the model list stream a
coordinator reads (WatchModels): states, nodes, deployments and reasons, without
counters (the board coordinators see carries none). Either way the connection is
the party's own: mutual TLS with its certificate, every request signed by its
registered key, and audited by the orchestrator.

Output. On a terminal the table is redrawn in place (the terminal's alternate
screen, restored on exit; Ctrl-C quits). Elsewhere (a pipe, a file) a plain table
is printed once, or once per interval with `--watch`: a header line then one line
per model, no escape codes, so it greps. `--json` prints one JSON document (one per
line with `--watch`) with these stable keys:

    {"crunch_id", "source": "operator" | "coordinator", "orchestrator": "host:port", "time_ms",
     "models": [{"model_id", "model_name", "cruncher_id", "cruncher_name", "state", "state_reason",
                 "state_since_ms", "uptime_seconds" (null unless RUNNING), "node_id", "address",
                 "deployment_id",
                 "restarts" (null from a coordinator),
                 "last_failure": {"code", "message", "time_ms"} (null: none, or from a coordinator),
                 "calls": {"count", "failures", "last_status" (SUCCESS | FAILURE | TIMEOUT | null),
                           "last_latency_us", "last_call_ms", "last_failure_code",
                           "last_failure_message"} (null: not polled yet, or from a coordinator)}]}

Errors (exit status 2, one line on stderr, no traceback): the orchestrator cannot
be reached (UNREACHABLE), refuses the credentials (its reason code, e.g.
PEER_UNAUTHENTICATED), or the files are unusable (PKI_INVALID). Once a first
table was shown, a failed refresh is shown under the table and retried.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import time
from datetime import UTC, datetime

import grpc

from secure_runner.errors import ErrorCode, RequestError, SecureRunnerError
from secure_runner.operator_cli import OperatorClient, add_connection_flags, credentials_from
from secure_runner.transport.status import reason_of
from secure_runner.v1 import operator_pb2, orchestrator_pb2, runner_pb2

WATCH_RPC = "/secure_runner.v1.Orchestrator/WatchModels"
FIRST_SNAPSHOT_SECONDS = 10.0
RECONNECT_SECONDS = 1.0
MAX_REASON = 160  # characters of a reason or message on a table line (the JSON carries them whole)
# The terminal: the alternate screen and a hidden cursor while drawing, each frame from the top left.
ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
COLUMNS = ("MODEL", "STATE", "UPTIME", "NODE", "DEPLOYMENT", "CALLS", "FAILED", "LAST", "LATENCY", "REASON")


class OrchestratorClient(OperatorClient):
    """The operator client's signed mTLS channel, plus the coordinators' model list stream."""

    def watch(self) -> grpc.aio.UnaryStreamCall:
        body, metadata = self.signed(WATCH_RPC, orchestrator_pb2.WatchModelsRequest(crunch_id=self._crunch_id))
        stream = self._channel.unary_stream(WATCH_RPC, response_deserializer=orchestrator_pb2.ModelList.FromString)
        return stream(body, metadata=metadata)


class OperatorSource:
    """Asks ListModels at every refresh."""

    name = "operator"

    def __init__(self, client: OrchestratorClient) -> None:
        self._client = client

    async def models(self) -> list[dict]:
        return [_operator_row(model) for model in (await self._client.list()).models]

    def close(self) -> None:
        pass


class CoordinatorSource:
    """Reads the WatchModels stream in the background (snapshots come on every change); reopens it if it ends."""

    name = "coordinator"

    def __init__(self, client: OrchestratorClient) -> None:
        self._client = client
        self._latest: orchestrator_pb2.ModelList | None = None
        self._error: Exception | None = None
        self._news = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                async for snapshot in self._client.watch():
                    self._latest, self._error = snapshot, None
                    self._news.set()
                self._error = RequestError(ErrorCode.UNREACHABLE, "the orchestrator ended the model list stream")
            except grpc.aio.AioRpcError as exc:
                self._error = exc
            self._news.set()
            await asyncio.sleep(RECONNECT_SECONDS)

    async def models(self) -> list[dict]:
        if self._latest is None:
            try:
                await asyncio.wait_for(self._news.wait(), FIRST_SNAPSHOT_SECONDS)
            except TimeoutError:
                raise RequestError(ErrorCode.UNREACHABLE, "no model list from the orchestrator in time") from None
        if self._error is not None:
            raise self._error
        return [_board_row(info) for info in self._latest.models]

    def close(self) -> None:
        self._reader.cancel()


def _board_row(info: orchestrator_pb2.ModelInfo) -> dict:
    state = orchestrator_pb2.ModelState.Name(info.state).removeprefix("MODEL_STATE_")
    running = info.state == orchestrator_pb2.MODEL_STATE_RUNNING and info.state_since_ms
    return {
        "model_id": info.model_id, "model_name": info.model_name, "cruncher_id": info.cruncher_id,
        "cruncher_name": info.cruncher_name, "state": state, "state_reason": info.state_reason,
        "state_since_ms": info.state_since_ms,
        "uptime_seconds": max(0, int(time.time() - info.state_since_ms / 1000)) if running else None,
        "node_id": info.node_id, "address": info.address, "deployment_id": info.deployment_id,
        "restarts": None, "last_failure": None, "calls": None,
    }


def _operator_row(model: operator_pb2.OperatorModel) -> dict:
    row = _board_row(model.info)
    row["restarts"] = model.restarts
    if model.last_failure_code:
        row["last_failure"] = {"code": model.last_failure_code, "message": model.last_failure_message,
                               "time_ms": model.last_failure_ms}
    if model.HasField("calls"):
        calls = model.calls
        row["calls"] = {
            "count": calls.calls, "failures": calls.failures,
            "last_status": runner_pb2.CallStatus.Name(calls.last_status).removeprefix("CALL_STATUS_")
            if calls.last_status else None,
            "last_latency_us": calls.last_latency_us, "last_call_ms": calls.last_call_ms,
            "last_failure_code": calls.last_failure_code, "last_failure_message": calls.last_failure_message,
        }
    return row


# -- rendering ---------------------------------------------------------------------------------------


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 else f"{rest}s"


def _latency(micros: int) -> str:
    return f"{micros / 1000:.1f}ms" if micros >= 1000 else f"{micros}us"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _reason(row: dict) -> str:
    """Why the model is not fine: its state's reason, else its last failed call, else its last failure."""
    calls, failure = row["calls"], row["last_failure"]
    if row["state_reason"]:
        return _one_line(row["state_reason"])
    if calls and calls["last_failure_code"]:
        return _one_line(f"last failed call: {calls['last_failure_code']}: {calls['last_failure_message']}")
    if failure:
        return _one_line(f"{failure['code']}: {failure['message']}")
    return "-"


def table_lines(rows: list[dict]) -> list[str]:
    """A header and one line per model, columns aligned, nothing but printable text."""
    cells = [COLUMNS]
    for row in sorted(rows, key=lambda r: r["model_id"]):
        calls = row["calls"]
        cells.append((
            row["model_id"], row["state"], _duration(row["uptime_seconds"]), row["node_id"] or "-",
            row["deployment_id"] or "-",
            str(calls["count"]) if calls else "-", str(calls["failures"]) if calls else "-",
            (calls["last_status"] or "-") if calls else "-",
            _latency(calls["last_latency_us"]) if calls and calls["last_status"] else "-",
            _reason(row),
        ))
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS) - 1)]
    return ["  ".join([*(cell.ljust(width) for cell, width in zip(line, widths)), line[-1]]) for line in cells]


def document(args: argparse.Namespace, source: str, rows: list[dict]) -> dict:
    return {"crunch_id": args.crunch, "source": source, "orchestrator": f"{args.host}:{args.port}",
            "time_ms": int(time.time() * 1000), "models": sorted(rows, key=lambda r: r["model_id"])}


class Screen:
    """Draws frames in place on a terminal: the alternate screen while it runs, the user's screen back after."""

    def __init__(self, out) -> None:
        self._out = out

    def __enter__(self) -> Screen:
        self._out.write(ENTER)
        self._out.flush()
        return self

    def __exit__(self, *exc) -> None:
        self._out.write(LEAVE)
        self._out.flush()

    def draw(self, lines: list[str]) -> None:
        width, height = shutil.get_terminal_size()
        shown = [line[: width - 1] for line in lines[: max(height - 1, 1)]]  # no wrapping, no scrolling
        self._out.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in shown) + CLEAR_BELOW)
        self._out.flush()


def _describe(exc: Exception) -> tuple[str, str]:
    """(code, message) of a failure to read the model list."""
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ErrorCode.UNREACHABLE, f"the orchestrator cannot be reached ({exc.code().name})"
        return reason_of(exc) or exc.code().name, f"refused by the orchestrator ({exc.code().name}): {exc.details()}"
    if isinstance(exc, SecureRunnerError):
        return exc.code, exc.message
    return ErrorCode.INTERNAL, repr(exc)


async def _show(args: argparse.Namespace, source, stop: asyncio.Event) -> None:
    """Refresh until `stop` (or once, unless live or --watch); the first failure ends it, later ones are shown."""
    out = sys.stdout
    live = out.isatty() and not args.json
    screen = Screen(out) if live else None
    shown_once, note = False, ""
    with screen or contextlib.nullcontext():
        while not stop.is_set():
            try:
                rows = await _unless_stopped(source.models(), stop)
                note = ""
            except (grpc.aio.AioRpcError, SecureRunnerError) as exc:
                if not shown_once:
                    raise
                code, message = _describe(exc)
                note = f"refresh failed at {datetime.now(UTC):%H:%M:%S}: {code}: {_one_line(message)}"
                rows = None
            if stop.is_set():
                return
            if live:
                if rows is not None:
                    frame = table_lines(rows)
                title = (f"secure-runner status: crunch {args.crunch} at {args.host}:{args.port} as {source.name}, "
                         f"{datetime.now(UTC):%H:%M:%S} UTC, every {args.interval:g} s (Ctrl-C quits)")
                screen.draw([title, "", *frame, *([""] + [note] if note else [])])
            elif rows is not None:
                text = json.dumps(document(args, source.name, rows)) if args.json else "\n".join(table_lines(rows))
                print(text + ("\n" if args.watch and not args.json else ""), flush=True)
            elif note:
                print(note, file=sys.stderr, flush=True)
            shown_once = True
            if not (live or args.watch):
                return
            try:
                await asyncio.wait_for(stop.wait(), args.interval)
            except TimeoutError:
                pass


async def _unless_stopped(fetch, stop: asyncio.Event) -> list[dict]:
    """What `fetch` returns, or [] at once if `stop` is set first (Ctrl-C never waits for a slow answer)."""
    fetching, stopping = asyncio.ensure_future(fetch), asyncio.ensure_future(stop.wait())
    await asyncio.wait({fetching, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not fetching.done():
        fetching.cancel()
        return []
    return fetching.result()


async def _run(args: argparse.Namespace, credentials) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with OrchestratorClient(args.crunch, args.host, args.port, credentials) as client:
        source = CoordinatorSource(client) if args.party == "coordinator" else OperatorSource(client)
        try:
            await _show(args, source, stop)
        finally:
            source.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secure-runner status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_flags(parser, "operator")
    parser.add_argument("--as", dest="party", choices=("operator", "coordinator"), default="operator",
                        help="whose credentials: an operator's (default; with call counters) or a coordinator's")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    parser.add_argument("--watch", action="store_true", help="not on a terminal: print a table every --interval")
    parser.add_argument("--json", action="store_true", help="one JSON document (one per line with --watch)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval <= 0:
        print("secure-runner status: --interval must be positive", file=sys.stderr)
        return 2
    credentials = credentials_from(args, args.party)
    if credentials is None:
        print("secure-runner status: give --pki, or each of --cert, --key, --ca, --identity", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(args, credentials))
    except (grpc.aio.AioRpcError, SecureRunnerError) as exc:
        code, message = _describe(exc)
        print(f"secure-runner status: error: {code}: {_one_line(message)}", file=sys.stderr)
        return 2
    return 0
