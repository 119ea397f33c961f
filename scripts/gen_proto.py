"""Regenerate the protobuf and gRPC Python code from proto/ into the package.

Usage: python scripts/gen_proto.py [--out DIR]

The committed output under secure_runner/v1/ must equal what this script
produces; tests/test_proto_fresh.py regenerates into a temporary folder and
compares, so a changed .proto without regenerated code fails the suite.
grpcio-tools is pinned in pyproject.toml because its bundled protoc decides
the exact bytes of the output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob("secure_runner/v1/*.proto"))


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency only

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Only services get a non-empty *_pb2_grpc.py; drop the empty twins.
    for stub in (out_dir / "secure_runner" / "v1").glob("*_pb2_grpc.py"):
        if "class " not in stub.read_text():
            stub.unlink()
    (out_dir / "secure_runner" / "v1" / "__init__.py").write_text(
        '"""Generated protobuf code. Do not edit: run scripts/gen_proto.py."""\n'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    generate(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
