"""Configuration (c) of benchmarks/fanout.py: the public reference stack, without any security.

Usage (by hand): python benchmarks/reference_harness.py --models 10 --rounds 50

What runs (everything on 127.0.0.1, every process a child of this one, all ended on return):
- N reference Model Runners, PyPI ``crunch-model-runner`` (its ``model-runner`` console script,
  default insecure mode: sync ``grpc.server`` with a 2-thread pool), one process per model,
  each hosting ``benchmarks/reference_model/submission`` (``EchoModel(EchoBase).echo(prices)``
  returns ``prices``), the base class ``refbench.base.EchoBase`` importable via PYTHONPATH;
- a fake Model Orchestrator (``_reference_driver.py orchestrator``): the WebSocket feed
  ``ws://127.0.0.1:<port>/<crunch_id>`` the reference client reads; it sends one ``init``
  event listing the N models (state RUNNING, ip, port, infos) once their ports accept TCP;
- the coordinator (``_reference_driver.py client``): PyPI ``model-runner-client``'s
  ``DynamicSubclassModelConcurrentRunner`` driven as its README shows: ``init()``, ``sync()``
  in the background, then fan-outs of ``call(method_name="echo", arguments=([Argument(position=1,
  data=Variant(type=VariantType.JSON, value=encode_data(VariantType.JSON, payload)))], []))``.

The two packages cannot share one venv: ``crunch-model-runner`` 0.4.2 pins protobuf<6 while
``model-runner-client`` 0.14.0 needs grpcio-health-checking>=1.74, i.e. protobuf>=6.31. In
production they run on different machines anyway, so ``benchmarks/.reference-venv`` holds two
venvs, ``runner/`` and ``client/`` (the fake orchestrator runs in ``client/``, which has
``websockets``).

Measurement (``run_reference``): warm-up rounds are excluded; runner CPU is the sum over the N
runner processes of utime+stime from /proc/<pid>/stat (10 ms ticks per process: use enough
rounds for small N) between the end of warm-up and the end of the measured rounds; client CPU is
the driver process's own CPU (``time.process_time``, all threads, gRPC core included) over the
measured rounds; RSS is VmRSS per runner after the rounds. Rounds run back to back.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procstat import cpu_seconds, p99, rss_mb

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH_DIR / ".reference-venv"
DRIVER = BENCH_DIR / "_reference_driver.py"
DRIVER_BOOT = f"sys.argv[0] = {str(DRIVER)!r}\nimport runpy\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
MODEL_BASE = BENCH_DIR / "reference_model" / "base"
MODEL_SUBMISSION = BENCH_DIR / "reference_model" / "submission"
BASE_CLASSNAME = "refbench.base.EchoBase"
CRUNCH_ID = "refbench"
HOST = "127.0.0.1"
PREFIX = "@@REF"

# What each venv gets: the reference package, plus every transitive dependency pinned to the
# version this harness was measured with (python 3.11, resolved by pip on 2 cores / x86_64).
REFERENCE_PINS: dict[str, dict[str, str]] = {
    "runner": {
        "crunch-model-runner": "0.4.2",
        "click": "8.5.1", "grpcio": "1.85.3", "grpcio-health-checking": "1.71.2",
        "importlib": "1.0.4", "iniconfig": "2.3.1", "joblib": "1.3.2", "numpy": "2.4.6",
        "packaging": "26.4", "pandas": "2.3.3", "pluggy": "1.7.0", "protobuf": "5.29.6",
        "pyarrow": "18.1.0", "Pygments": "2.21.0", "pytest": "8.4.2", "python-dateutil": "4.0.0",
        "pytz": "2026.6", "river": "0.22.0", "scipy": "1.17.1", "typing_extensions": "4.16.0",
        "tzdata": "2026.6",
    },
    "client": {
        "model-runner-client": "0.14.0",
        "base58": "2.1.1", "cffi": "2.1.1", "cryptography": "46.0.7", "grpcio": "1.85.3",
        "grpcio-health-checking": "1.85.1", "numpy": "2.4.6", "pandas": "2.3.3",
        "protobuf": "7.36.2", "pycparser": "3.12", "python-dateutil": "4.0.0", "pytz": "2026.6",
        "typing_extensions": "4.16.0", "tzdata": "2026.6", "websockets": "14.2",
    },
}
MAIN_PACKAGE = {"runner": "crunch-model-runner", "client": "model-runner-client"}
SMOKE_IMPORT = {
    "runner": "import model_runner.server",
    "client": "import model_runner_client.model_concurrent_runners, websockets.asyncio.server",
}
MARKER = "installed.json"

# Run first in every child interpreter: ask the kernel to SIGKILL the child when the thread that
# spawned it dies (so even a SIGKILLed harness leaves no reference process behind), and exit at
# once if that parent is already gone. Costs one ctypes import; no extra process or exec.
PDEATHSIG_PRELUDE = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(os.environ.get('REFBENCH_PARENT_PID', os.getppid())): os._exit(1)\n"
)
# The reference runner's own console script does `from model_runner.server import cli; cli()`.
RUNNER_BOOT = PDEATHSIG_PRELUDE + "sys.argv[0] = 'model-runner'\nfrom model_runner.server import cli\ncli()\n"


class ReferenceStackError(RuntimeError):
    """The reference stack could not be installed, started or driven."""


def _log(message: str) -> None:
    print(f"[reference] {message}", file=sys.stderr, flush=True)


# -- the reference venvs -----------------------------------------------------------------------


def _venv_python(root: Path, role: str) -> Path:
    return root / role / "bin" / "python"


def runner_command(root: Path) -> Path:
    """The reference runner's console script in the runner venv."""
    return root / "runner" / "bin" / "model-runner"


def runner_python(root: Path) -> Path:
    return _venv_python(root, "runner")


def client_python(root: Path) -> Path:
    return _venv_python(root, "client")


def _complete(root: Path) -> bool:
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        recorded.get("pins") == REFERENCE_PINS
        and runner_command(root).is_file()
        and client_python(root).is_file()
    )


def _pip_freeze(python: Path) -> list[str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--disable-pip-version-check"],
        capture_output=True, text=True, check=False,
    ).stdout
    return [line for line in out.splitlines() if line and not line.startswith("#")]


def _install_role(root: Path, role: str) -> list[str]:
    venv_dir = root / role
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True, capture_output=True)
    python = _venv_python(root, role)
    pins = REFERENCE_PINS[role]
    constraints = root / f"{role}-constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
    main = MAIN_PACKAGE[role]
    _log(f"installing {main}=={pins[main]} into {venv_dir} ...")
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q",
         "-c", str(constraints), f"{main}=={pins[main]}"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join(
            line for line in (proc.stdout + proc.stderr).splitlines() if "is ignored" not in line
        )[-3000:]
        raise ReferenceStackError(f"pip install of {main}=={pins[main]} (reference {role}) failed:\n{tail}")
    smoke = subprocess.run([str(python), "-c", SMOKE_IMPORT[role]], capture_output=True, text=True)
    if smoke.returncode != 0:
        raise ReferenceStackError(f"{main}=={pins[main]} installed but does not import:\n{smoke.stderr[-2000:]}")
    return _pip_freeze(python)


def ensure_reference_venv(path: Path = DEFAULT_VENV) -> Path:
    """Create (once) the reference venvs under ``path`` and return ``path``.

    ``path/runner`` holds crunch-model-runner, ``path/client`` model-runner-client (their
    protobuf pins conflict, so they cannot share a venv). Reused when ``path/installed.json``
    records the same pins and both entry points exist; otherwise rebuilt from scratch.
    Raises ``ReferenceStackError`` naming the package whose install failed.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(path):
            recorded = json.loads((path / MARKER).read_text())
            _log("reusing " + str(path) + ": " + ", ".join(
                f"{MAIN_PACKAGE[r]}=={REFERENCE_PINS[r][MAIN_PACKAGE[r]]}" for r in ("runner", "client")
            ) + f" (python {recorded.get('python')})")
            return path
        for role in ("runner", "client"):
            shutil.rmtree(path / role, ignore_errors=True)
        (path / MARKER).unlink(missing_ok=True)
        installed = {role: _install_role(path, role) for role in ("runner", "client")}
        for role, lines in installed.items():
            _log(f"{role} venv ({path / role}): " + " ".join(lines))
        (path / MARKER).write_text(json.dumps({
            "pins": REFERENCE_PINS,
            "installed": installed,
            "python": sys.version.split()[0],
        }, indent=1))
    return path


# -- process plumbing ----------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                        "GRPC_ADDRESS", "CODE_DIRECTORY", "RESOURCE_DIRECTORY", "MAIN_FILE",
                        "LOG_LEVEL", "HAS_GPU"}}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["REFBENCH_PARENT_PID"] = str(os.getpid())
    env.update(extra)
    return env


class _LineReader:
    """Reads ``@@REF KIND {json}`` lines from a child's stdout with a deadline."""

    def __init__(self, proc: subprocess.Popen, name: str):
        self.proc = proc
        self.name = name
        self.buffer = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(proc.stdout, selectors.EVENT_READ)
        self.fd = proc.stdout.fileno()

    def expect(self, kinds: set[str], timeout: float, watch=None) -> tuple[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                text = line.decode(errors="replace").strip()
                if not text.startswith(PREFIX + " "):
                    continue
                _, kind, body = text.split(" ", 2)
                payload = json.loads(body)
                if kind == "ERROR":
                    raise ReferenceStackError(f"{self.name} reported an error: {payload}")
                if kind in kinds:
                    return kind, payload
            if watch is not None:
                watch()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReferenceStackError(f"{self.name}: no {'/'.join(sorted(kinds))} within {timeout:.0f} s")
            if self.selector.select(timeout=min(remaining, 0.5)):
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise ReferenceStackError(f"{self.name} exited (code {self.proc.wait()}) before {'/'.join(sorted(kinds))}")
                self.buffer += chunk

    def close(self) -> None:
        self.selector.close()


def _stop_all(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
            p.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- the benchmark -------------------------------------------------------------------------------


def run_reference(
    n_models: int,
    rounds: int,
    payload: list[float],
    *,
    warmup: int | None = None,
    call_timeout_s: int = 30,
    ready_timeout_s: float | None = None,
    interval_s: float = 0.0,
    venv: Path = DEFAULT_VENV,
    submission: Path = MODEL_SUBMISSION,
) -> dict:
    """Run the reference stack for ``n_models`` models and ``rounds`` measured fan-outs.

    Returns a dict with p50_ms, p99_ms, rounds_per_s, client_cpu_us_per_call,
    runner_cpu_us_per_call, runner_rss_mb (median per runner), ready_s (from spawning the
    runners until the client's first successful full fan-out), all_success, samples_ms, plus
    context (n_models, rounds, warmup, versions, failure_reports, wall_s, ...).
    ``interval_s`` > 0 idles that long between measured rounds (a coordinator ticking on a
    clock; runners then pay their wake-up cost per call); the gap is not in the round times,
    but CPU spent in it is. ``submission`` is the model every runner hosts: an ``echo(prices)``
    returning ``prices``. Every process started here is ended before returning or raising.
    """
    if n_models < 1 or rounds < 1:
        raise ValueError("n_models and rounds must be >= 1")
    warmup = warmup if warmup is not None else max(5, min(20, rounds // 5))
    ready_timeout_s = ready_timeout_s if ready_timeout_s is not None else 120.0 + 2.0 * n_models
    root = ensure_reference_venv(venv)
    started_wall = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="refbench-"))
    (work / "resources").mkdir()
    logs = work / "logs"
    logs.mkdir()
    payload_file = work / "payload.json"
    payload_file.write_text(json.dumps(list(payload)))

    runners: list[subprocess.Popen] = []
    helpers: list[subprocess.Popen] = []
    log_files = []
    readers: list[_LineReader] = []
    keep_logs = False
    try:
        ports = _free_ports(n_models)
        models = [{"model_id": f"m{i:04d}", "port": port} for i, port in enumerate(ports)]
        (work / "models.json").write_text(json.dumps(models))
        runner_env = _child_env({"PYTHONPATH": str(MODEL_BASE)})
        client_env = _child_env({})

        # 1. the runners (t0 = spawn of the first one)
        t0 = time.monotonic()
        for model in models:
            log = open(logs / f"runner-{model['model_id']}.log", "wb")
            log_files.append(log)
            runners.append(subprocess.Popen(
                [str(runner_python(root)), "-c", RUNNER_BOOT,
                 "--address", f"{HOST}:{model['port']}",
                 "--code-directory", str(submission),
                 "--resource-directory", str(work / "resources")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=work, env=runner_env,
            ))

        def watch_runners() -> None:
            for model, proc in zip(models, runners):
                if proc.poll() is not None:
                    log = logs / f"runner-{model['model_id']}.log"
                    raise ReferenceStackError(
                        f"reference runner {model['model_id']} (port {model['port']}) exited with "
                        f"code {proc.returncode}:\n{_tail(log)}")

        # 2. the fake orchestrator
        orch_log = open(logs / "orchestrator.log", "wb")
        log_files.append(orch_log)
        orchestrator = subprocess.Popen(
            [str(client_python(root)), "-c", PDEATHSIG_PRELUDE + DRIVER_BOOT, "orchestrator",
             "--models", str(work / "models.json"), "--crunch-id", CRUNCH_ID],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=orch_log, cwd=work, env=client_env,
        )
        helpers.append(orchestrator)
        orch_reader = _LineReader(orchestrator, "fake orchestrator")
        readers.append(orch_reader)
        _, listening = orch_reader.expect({"LISTENING"}, timeout=60, watch=watch_runners)

        # 3. the coordinator driver
        driver_log = open(logs / "client.log", "wb")
        log_files.append(driver_log)
        driver = subprocess.Popen(
            [str(client_python(root)), "-c", PDEATHSIG_PRELUDE + DRIVER_BOOT, "client",
             "--port", str(listening["port"]), "--crunch-id", CRUNCH_ID,
             "--base-classname", BASE_CLASSNAME, "--n-models", str(n_models),
             "--rounds", str(rounds), "--warmup", str(warmup),
             "--timeout", str(call_timeout_s), "--ready-timeout", str(ready_timeout_s),
             "--interval", str(interval_s), "--payload", str(payload_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=driver_log, cwd=work, env=client_env,
        )
        helpers.append(driver)
        reader = _LineReader(driver, "reference client driver")
        readers.append(reader)

        _, ready = reader.expect({"READY"}, timeout=ready_timeout_s + 60, watch=watch_runners)
        ready_s = ready["t_ready"] - t0
        _, warm = reader.expect({"WARM"}, timeout=60 + warmup * (n_models * 0.05 + 1), watch=watch_runners)

        runner_pids = [p.pid for p in runners]
        cpu_before = cpu_seconds(runner_pids)
        driver.stdin.write(b"GO\n")
        driver.stdin.flush()
        _, done = reader.expect({"DONE"}, timeout=120 + rounds * (n_models * 0.05 + 1 + interval_s),
                                watch=watch_runners)
        cpu_after = cpu_seconds(runner_pids)
        rss = [rss_mb(pid) for pid in runner_pids]
        watch_runners()

        samples_ms = [s * 1000.0 for s in done["samples_s"]]
        calls = rounds * n_models
        return {
            "config": "reference (crunch-model-runner + model-runner-client, insecure)",
            "n_models": n_models,
            "rounds": rounds,
            "warmup": warmup,
            "interval_s": interval_s,
            "p50_ms": statistics.median(samples_ms),
            "p99_ms": p99(samples_ms),
            "rounds_per_s": rounds / (sum(samples_ms) / 1000.0),
            "client_cpu_us_per_call": done["cpu_s"] * 1e6 / calls,
            "runner_cpu_us_per_call": (cpu_after - cpu_before) * 1e6 / calls,
            "runner_rss_mb": statistics.median(rss),
            "ready_s": ready_s,
            "all_success": done["bad_results"] == 0 and warm["bad_results"] == 0 and done["echoed_ok"]
                           and done["connected_models"] == n_models,
            "samples_ms": samples_ms,
            "bad_results": done["bad_results"],
            "failure_reports": sum(
                1 for line in _tail(logs / "orchestrator.log", 10**6).splitlines() if line.startswith("REPORT ")
            ),
            "versions": {MAIN_PACKAGE[r]: REFERENCE_PINS[r][MAIN_PACKAGE[r]] for r in ("runner", "client")},
            "wall_s": time.monotonic() - started_wall,
        }
    except ReferenceStackError as exc:
        keep_logs = True
        reports = [line for line in _tail(logs / "orchestrator.log", 10**6).splitlines() if line.startswith("REPORT ")]
        raise ReferenceStackError(
            f"{exc}\n{len(reports)} failure reports from the client"
            + (f", first: {reports[0][7:]}" if reports else "")
            + f"\n(logs kept in {logs}; client log tail:\n{_tail(logs / 'client.log')})") from None
    finally:
        _stop_all(helpers + runners)
        for r in readers:
            r.close()
        for p in helpers:
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        for f in log_files:
            f.close()
        if not keep_logs:
            shutil.rmtree(work, ignore_errors=True)


def default_payload(size: int = 100) -> list[float]:
    """The benchmark payload, for every configuration of every benchmark: 100 floats."""
    return [100.0 + i / 7 for i in range(size)]


def main() -> None:
    # A plain SIGTERM would skip run_reference's cleanup: turn it into SystemExit.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--interval", type=float, default=0.0, help="idle seconds between measured rounds")
    parser.add_argument("--samples", action="store_true", help="also print every round time")
    args = parser.parse_args()
    result = run_reference(args.models, args.rounds, default_payload(), warmup=args.warmup,
                           interval_s=args.interval)
    if not args.samples:
        result["samples_ms"] = f"<{len(result['samples_ms'])} values>"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
