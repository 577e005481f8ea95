"""The checked-in generated code (sidecar/v1/) must be exactly what protos/ generates today."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("sidecar_pb2.py", "sidecar_pb2.pyi", "sidecar_pb2_grpc.py")


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)],
                   check=True, cwd=ROOT, timeout=60)
    for name in GENERATED:
        fresh = (tmp_path / "sidecar" / "v1" / name).read_text()
        checked_in = (ROOT / "sidecar" / "v1" / name).read_text()
        assert fresh == checked_in, (
            f"sidecar/v1/{name} is stale: run `.venv/bin/python scripts/gen_protos.py` and commit it")


def test_service_has_the_documented_rpcs() -> None:
    from sidecar.v1 import sidecar_pb2

    service = sidecar_pb2.DESCRIPTOR.services_by_name["Sidecar"]
    assert service.full_name == "sidecar.v1.Sidecar"
    assert {m.name for m in service.methods} == {
        "Execute", "ListOps", "GetHardware", "Release", "WatchTelemetry",
        "Load", "Unload", "ListResources", "CloseSession", "ExecuteStream", "AckChunks"}
