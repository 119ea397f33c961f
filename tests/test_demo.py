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
    # The sandbox is probed first and its state said plainly.
    assert out.startswith(("sandbox: all 9 worker layers active", "WARNING: sandbox layers missing"))
