"""The local-process launcher: each node's runner a `secure-runner runner` process on this host.

A runner is started so it outlives the orchestrator: a session of its own (no
terminal or process-group signal of the orchestrator reaches it), no parent-death
signal, stdin from /dev/null, stdout only until it prints `READY <port>`, its log
in `<state>/logs/<node>.log` (rotated by the runner). Killing the orchestrator,
with SIGKILL or SIGTERM, leaves it serving. When the orchestrator's metrics are on,
each runner serves its own too, on a free port it names in its READY line
(`READY <port> metrics=<port>`), kept in its handle so an adopted runner is found again.

It is found again by its handle: pid, the kernel's start time of that pid (so a
reused pid is not mistaken for it), its control socket and the node's deployment
id. `adopt` opens a pidfd first (so the pid cannot be reused under it), then checks
the start time, then asks the runner itself on its control socket (STATUS), which
must name the expected node and deployment. A process that matches pid and start
time but does not answer so is ours yet out of control: it is killed, so a new
runner never shares the node's certificate files with an old one.

Control sockets live in `<state>/control/`, created 0700 for the orchestrator's
user; the runner refuses any other directory and any peer of another user
(runner/control.py). Exits are watched with a pidfd, for adopted runners as for
runners started here, and the runners started here are reaped by pid; no asyncio
child watcher is involved (whose waitpid raced ours: "Unknown child process pid").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from secure_runner.orchestrator.launcher import LauncherError, ModelStatus, RunnerSpec
from secure_runner.runner.call_stats import CallStats
from secure_runner.runner.control import check_socket_path, peer_credentials
from secure_runner.runner.server import RunnerSettings
from secure_runner.runner.supervisor import HELLO_TIMEOUT_SECONDS

log = logging.getLogger(__name__)

# A runner confirms a control command within this, or is killed. A stop first lets the model's
# call in progress end, which the runner cuts off at its longest call (the runners here run with
# their default); a redeploy then starts a worker, which reports within the hello timeout.
CONTROL_TIMEOUT_SECONDS = RunnerSettings.model_fields["max_call_seconds"].default + HELLO_TIMEOUT_SECONDS
STATUS_TIMEOUT_SECONDS = 5.0
MAX_ANSWER = 1 << 20  # a STATUS answer for a node of many models fits
TAIL_BYTES = 4 << 20  # how much of the end of a runner's log file `model_logs` reads


def process_start_time(pid: int) -> int:
    """The kernel's start time of `pid` (clock ticks since boot; /proc/<pid>/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        raise LauncherError(f"process {pid} is gone") from None
    return int(stat.rpartition(")")[2].split()[19])


def _tail_model_lines(log_file: Path, model_id: str, lines: int) -> list[str]:
    """Worker output lines are the supervisor's `model <id>: <line>` log lines (runner/supervisor.py)."""
    marker = f" secure_runner.runner.supervisor: model {model_id}: "
    found: list[str] = []
    for path in (log_file, log_file.with_name(log_file.name + ".1")):  # newest first
        try:
            with open(path, "rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - TAIL_BYTES))
                text = file.read().decode(errors="replace")
        except OSError:
            continue
        found = [line for line in text.splitlines() if marker in line] + found
        if len(found) >= lines:
            break
    return found[-lines:]


class LocalRunner:
    """One runner process: watched through a pidfd, controlled through its socket."""

    def __init__(self, node_id: str, deployment: str, address: str, pid: int, start_time: int, socket_path: Path,
                 pidfd: int, popen: subprocess.Popen | None = None) -> None:
        self.node_id = node_id
        self.deployment = deployment
        self.address = address
        self.pid = pid
        self._start_time = start_time
        self._socket = socket_path
        self._pidfd = pidfd
        self._popen = popen  # set when started by this orchestrator: reaped here
        self.returncode: int | None = None  # None while it runs; -1 if it exited adopted (status unknown)
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        loop.add_reader(pidfd, self._on_exit)
        self.metrics_address = ""  # host:port of its metrics endpoint; "" if it serves none

    @property
    def handle(self) -> dict:
        return {"pid": self.pid, "start_time": self._start_time, "socket": str(self._socket),
                "address": self.address, "deployment": self.deployment, "metrics": self.metrics_address}

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = -1
        if self._popen is not None:
            with contextlib.suppress(ChildProcessError):
                _pid, status = os.waitpid(self.pid, 0)  # the pidfd said it exited: this does not block
                self.returncode = self._popen.returncode = os.waitstatus_to_exitcode(status)
        self._exited.set_result(None)

    async def wait(self) -> str:
        await asyncio.shield(self._exited)
        return f"exit status {self.returncode}" if self.returncode != -1 else "exited"

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if not self._exited.done():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, sig)

    async def stop(self, grace: float) -> None:
        self._signal(signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            await asyncio.wait_for(self.wait(), grace if grace > 0 else None)
        except TimeoutError:
            self.kill()
            await self.wait()

    async def _ask(self, line: str, timeout: float) -> str:
        """One command on the control socket; its answer line."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(self._socket), limit=MAX_ANSWER)
                try:
                    writer.write(line.encode() + b"\n")
                    await writer.drain()
                    answer = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError, ValueError) as exc:
            raise LauncherError(f"runner {self.node_id}: {line.split()[0]} not answered: {exc!r}") from None
        return answer.decode(errors="replace").rstrip("\n")

    async def control(self, verb: str, model_id: str) -> None:
        answer = await self._ask(f"{verb} {model_id}", CONTROL_TIMEOUT_SECONDS)
        if answer != f"OK {verb} {model_id}":
            raise LauncherError(f"runner {self.node_id}: {verb} {model_id} not confirmed: {answer[:200]!r}")

    async def statuses(self) -> dict[str, ModelStatus]:
        """STATUS: each hosted model's status; raises unless the runner names this node and deployment."""
        answer = await self._ask(f"STATUS {self.node_id}", STATUS_TIMEOUT_SECONDS)
        words = answer.split(" ", 4)
        if words[:4] != ["OK", "STATUS", self.node_id, self.deployment] or len(words) != 5:
            raise LauncherError(f"runner {self.node_id}: not deployment {self.deployment}: {answer[:200]!r}")
        try:
            return {model_id: _model_status(fields) for model_id, fields in json.loads(words[4]).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise LauncherError(f"runner {self.node_id}: unreadable STATUS answer: {exc}") from None


def _model_status(fields: dict) -> ModelStatus:
    """One model's entry of a STATUS answer; its call counters checked for type and bounds."""
    calls = fields.pop("calls", None)  # absent from a runner of an older release
    return ModelStatus(**fields, calls=None if calls is None else CallStats.from_fields(calls))


def parse_ready(line: bytes) -> tuple[int, int | None]:
    """A runner's `READY <port>` or `READY <port> metrics=<port>` line (cli.py): its port, its metrics port."""
    words = line.decode(errors="replace").split()
    if words[:1] != ["READY"] or len(words) not in (2, 3) or len(words) == 3 and not words[2].startswith("metrics="):
        raise ValueError(line[:100])
    return int(words[1]), int(words[2].removeprefix("metrics=")) if len(words) == 3 else None


class ProcessLauncher:
    """Starts and adopts runner processes; `settings()` gives the orchestrator's current settings."""

    def __init__(self, settings: Callable[[], object], state_dir: Path) -> None:
        self._settings = settings
        self.control_dir = state_dir / "control"
        self.logs_dir = state_dir / "logs"
        for folder in (self.control_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.control_dir, 0o700)  # mkdir's mode is masked by the umask, and an old folder may differ

    def log_file(self, node_id: str) -> Path:
        return self.logs_dir / f"{node_id}.log"

    def _command(self, spec: RunnerSpec, socket_path: Path) -> list[str]:
        s = self._settings()
        command = [
            sys.executable, "-m", "secure_runner.cli", "runner",
            "--crunch", s.crunch_id,
            "--node-id", spec.node_id,
            "--pki", str(Path(s.pki_dir).resolve()),
            "--host", s.host,
            "--port", "0",
            "--log-level", s.runner_log_level,
            "--log-format", s.runner_log_format,
            "--log-file", str(self.log_file(spec.node_id)),
            "--audit-log", str(s.audit_folder / f"runner-{spec.node_id}.jsonl"),
            "--control-socket", str(socket_path),
            "--deployment", spec.deployment,
        ]
        if s.metrics is not None:  # its own endpoint on any free port, named in its READY line
            command += ["--metrics-port", "0", "--metrics-host", s.metrics.host] + ["--metrics-tls"] * s.metrics.tls
        for model_id, path in spec.models.items():
            command += ["--model", f"{model_id}={path.resolve()}"]
        for base in s.base_paths:
            command += ["--base-path", str(base.resolve())]
        for layer in s.allow_missing_layers:
            command += ["--allow-missing-layer", layer]
        if s.chain_config is not None:
            command += ["--registry-source", "chain", "--chain-config", str(Path(s.chain_config).resolve())]
        return command

    async def model_logs(self, node_id: str, model_id: str, lines: int) -> list[str]:
        """The last `lines` lines of the model's worker output in the node's log (and its rotated part)."""
        return await asyncio.to_thread(_tail_model_lines, self.log_file(node_id), model_id, lines)

    async def _end_orphan(self, socket_path: Path) -> None:
        """Kill a runner still listening on the node's socket that no handle names.

        An orchestrator killed between starting a runner and storing its handle leaves one
        behind; a new runner for the node must not serve next to it. The socket is in the
        orchestrator's private directory, and the kernel names its listener (SO_PEERCRED).
        """
        if not socket_path.is_socket():
            return
        try:
            async with asyncio.timeout(STATUS_TIMEOUT_SECONDS):
                _reader, writer = await asyncio.open_unix_connection(str(socket_path))
        except (OSError, TimeoutError):
            return  # nobody listens: the runner will replace the stale file
        pid, uid = peer_credentials(writer.get_extra_info("socket"))[:2]
        writer.close()
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        if uid == os.geteuid() and b"--control-socket" in argv and os.fsencode(socket_path) in argv:
            log.warning("killing an orphaned runner (pid %d) still listening on %s", pid, socket_path)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def start(self, spec: RunnerSpec) -> LocalRunner:
        socket_path = self.control_dir / f"{spec.node_id}.sock"
        check_socket_path(socket_path)
        await self._end_orphan(socket_path)
        with open(self.log_file(spec.node_id), "ab") as stderr:  # what escapes the runner's logging: tracebacks
            popen = subprocess.Popen(
                self._command(spec, socket_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                start_new_session=True, close_fds=True,
            )
        runner = LocalRunner(spec.node_id, spec.deployment, "", popen.pid, process_start_time(popen.pid), socket_path,
                             os.pidfd_open(popen.pid), popen)
        try:
            port, metrics_port = parse_ready(await self._ready_line(popen))
        except (TimeoutError, ValueError, OSError) as exc:
            await runner.stop(0)
            raise LauncherError(f"runner {spec.node_id} did not become ready: {exc!r}"[:300]) from None
        finally:
            popen.stdout.close()  # the runner writes nothing after READY: it outlives this end of the pipe
        runner.address = f"{self._settings().host}:{port}"
        if metrics_port is not None:
            runner.metrics_address = f"{self._settings().metrics.host}:{metrics_port}"
        return runner

    async def _ready_line(self, popen: subprocess.Popen) -> bytes:
        reader = asyncio.StreamReader(limit=256)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(
            os.dup(popen.stdout.fileno()), "rb", buffering=0))
        try:
            line = await asyncio.wait_for(reader.readline(), self._settings().runner_start_timeout)
        finally:
            transport.close()
        return line

    async def adopt(self, node_id: str, handle: dict) -> LocalRunner:
        try:
            pid, start_time, deployment = int(handle["pid"]), int(handle["start_time"]), str(handle["deployment"])
            socket_path, address = Path(handle["socket"]), str(handle["address"])
            pidfd = os.pidfd_open(pid)
        except (KeyError, ValueError, TypeError) as exc:
            raise LauncherError(f"node {node_id}: unusable handle: {exc!r}") from None
        except OSError:
            raise LauncherError(f"node {node_id}: runner pid {pid} is gone") from None
        try:
            if process_start_time(pid) != start_time:
                raise LauncherError(f"node {node_id}: pid {pid} is another process now")
        except LauncherError:
            os.close(pidfd)
            raise
        runner = LocalRunner(node_id, deployment, address, pid, start_time, socket_path, pidfd)
        runner.metrics_address = str(handle.get("metrics", ""))
        try:
            await runner.statuses()
        except LauncherError:
            log.error("runner %s (pid %d) does not answer as deployment %s: killing it", node_id, pid, deployment)
            await runner.stop(0)
            raise
        return runner
