"""`secure-runner demo`, run exactly as a user runs it."""

import re
import shutil
import subprocess
import sys
from pathlib import Path


def _rows(output: str, title: str) -> dict[str, list[str]]:
    block = output.split(f"== {title}", 1)[1].split("==", 1)[0]
    rows = {}
    for line in block.splitlines()[3:]:
        if line.strip() and not line.startswith("still connected"):
            fields = line.split()
            rows[fields[0]] = fields
    return rows


def test_demo_shows_success_timeout_and_failure_with_identities():
    command = [shutil.which("secure-runner") or sys.executable, "demo", "--rounds", "2"]
    if command[0] == sys.executable:
        command[1:1] = ["-m", "secure_runner.cli"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    tick = _rows(out, "round 1: tick(")
    assert tick["good-model"][:2] == ["good-model", "Alice"]
    assert tick["good-model"][3] == "SUCCESS"
    assert tick["slow-model"][3] == "TIMEOUT" and "MODEL_TIMEOUT" in " ".join(tick["slow-model"])
    assert tick["raising-model"][3] == "FAILURE" and "MODEL_RAISED" in " ".join(tick["raising-model"])
    for fields in tick.values():
        assert re.fullmatch(r"\d+\.\dms", fields[4]), fields
        assert fields[2].startswith(fields[0] + "-")  # deployment id
    predict = _rows(out, "round 1: predict(3)")
    assert predict["good-model"][3] == "SUCCESS" and float(predict["good-model"][5]) > 0
    # The slow model is dropped after 3 consecutive timeouts (round 2's tick is its third).
    assert "still connected: good-model, raising-model" in out
    assert out.rstrip().endswith("demo finished: everything shut down")
    assert "Traceback" not in done.stderr
    pki_line = next(line for line in out.splitlines() if line.startswith("PKI: "))
    assert not Path(pki_line.rsplit(" in ", 1)[1]).exists()  # the temporary PKI is gone
    # Starting the runners says `started k of N`, each naming its node's models.
    started = re.findall(r"^orchestrator: started (\d+) of (\d+) runners: node-\d+ \((.+)\)$", out, re.M)
    total = int(started[0][1])
    assert [(int(k), int(n)) for k, n, _ in started] == [(k, total) for k in range(1, total + 1)]
    assert sorted(m for *_, models in started for m in models.split(", ")) == ["good-model", "raising-model",
                                                                                "slow-model"]
    # The sandbox is probed first and its state said plainly.
    assert out.startswith(("sandbox: all 9 worker layers active", "WARNING: sandbox layers missing"))


async def test_start_progress_names_a_runner_that_failed_and_why(tmp_path, capsys):
    """A node whose only submission its worker cannot read: its runner never serves, and the progress says so."""
    from conftest import BASE_PATH, CRUNCH, MODELS, fresh_pki
    from secure_runner.demo import print_progress
    from secure_runner.orchestrator.local import LocalOrchestrator, LocalOrchestratorSettings

    layout = fresh_pki(tmp_path, "alpha", "broken")
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    (submissions / "alpha").symlink_to(MODELS / "submissions" / "counter")
    broken = shutil.copytree(MODELS / "submissions" / "counter", submissions / "broken")
    broken.chmod(0o000)  # its worker (another uid) cannot read it: its runner, hosting nothing else, cannot start
    orchestrator = LocalOrchestrator(LocalOrchestratorSettings(
        crunch_id=CRUNCH, submissions=submissions, pki_dir=layout.root, base_paths=[BASE_PATH], models_per_node=1,
        restart_backoff_first=30.0), progress=print_progress)
    try:
        await orchestrator.start()
    finally:
        await orchestrator.stop()
        broken.chmod(0o755)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("orchestrator: ")]
    assert len(lines) == 2 and sorted(line.split()[2] for line in lines) == ["1", "2"]
    failed = next(line for line in lines if "FAILED" in line)
    assert re.search(r"runner \d of 2 FAILED: broken \(broken\): RUNNER_FAILED: ", failed), failed
    assert any(re.search(r"started \d of 2 runners: alpha \(alpha\)$", line) for line in lines), lines
