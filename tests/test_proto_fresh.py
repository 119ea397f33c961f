"""The committed generated code is exactly what scripts/gen_proto.py makes from proto/."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True)
    fresh = tmp_path / "secure_runner" / "v1"
    committed = ROOT / "secure_runner" / "v1"
    fresh_files = sorted(p.name for p in fresh.iterdir() if p.is_file())
    committed_files = sorted(p.name for p in committed.iterdir() if p.is_file())
    assert fresh_files == committed_files
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, fresh_files, shallow=False)
    assert mismatch == [] and errors == [], f"stale generated code: {mismatch}; run scripts/gen_proto.py"


def test_every_proto_is_generated():
    protos = {p.stem for p in (ROOT / "proto" / "secure_runner" / "v1").glob("*.proto")}
    generated = {p.name.removesuffix("_pb2.py") for p in (ROOT / "secure_runner" / "v1").glob("*_pb2.py")}
    assert protos == generated
