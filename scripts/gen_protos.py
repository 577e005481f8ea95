"""Regenerate the checked-in Python code of the wire contract (protos/ -> sidecar/v1/).

Usage: python scripts/gen_protos.py [OUTPUT_ROOT]   (default: the repository root)
tests/test_proto_drift.py runs this into a temporary folder and fails when the result differs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = "sidecar/v1/sidecar.proto"


def generate(out_root: Path) -> None:
    include = Path(grpc_tools.__file__).parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        PROTO,
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
