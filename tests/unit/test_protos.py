"""The committed generated protobuf code is what the pinned generators produce today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "libs/mlpipe/src/mlpipe"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make protos`, written to a temporary directory instead of the source tree."""
    out = tmp_path_factory.mktemp("protos")
    protos = sorted(str(p.relative_to(REPO)) for p in (REPO / "protos/mlpipe/v1").glob("*.proto"))
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        "protos",
        f"--python_out={out}",
        f"--mypy_out={out}",
        *protos,
    ]
    # The mypy plugin reports each file it writes on stderr; only the exit status matters.
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return out / "mlpipe"


@pytest.mark.parametrize("name", ["v1/events_pb2.py", "v1/events_pb2.pyi"])
def test_committed_generated_code_is_fresh(regenerated: Path, name: str) -> None:
    assert (regenerated / name).read_bytes() == (COMMITTED / name).read_bytes(), (
        f"{name} is stale: run `make protos` and commit the result"
    )


def test_every_generated_file_is_committed(regenerated: Path) -> None:
    generated = {p.relative_to(regenerated) for p in regenerated.rglob("*") if p.is_file()}

    missing = [str(p) for p in sorted(generated) if not (COMMITTED / p).is_file()]

    assert generated
    assert missing == []
