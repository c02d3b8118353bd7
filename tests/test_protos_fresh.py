"""The committed *_pb2 files are exactly what grpcio-tools generates from protos/ (regenerate: make protos)."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools.protoc")
    sources = sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto"))
    assert sources, "no .proto files found"
    work = tmp_path / "protos"
    shutil.copytree(PROTOS, work, ignore=shutil.ignore_patterns("*_pb2*.py*", "__pycache__"))
    # a subprocess: protoc inside a process that already imported the generated modules can crash
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{work}", f"--python_out={work}", f"--pyi_out={work}",
            f"--grpc_python_out={work}"]
    subprocess.run(args + [str(work / s) for s in sources], check=True, cwd=tmp_path)
    stale = []
    for generated in work.rglob("*_pb2*.py*"):
        committed = PROTOS / generated.relative_to(work)
        if not committed.exists() or not filecmp.cmp(generated, committed, shallow=False):
            stale.append(str(committed.relative_to(ROOT)))
    assert not stale, f"generated code is stale, run `make protos`: {stale}"
