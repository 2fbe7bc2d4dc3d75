"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and each one breaks when
a module crosses its boundary: the check runs on a copy of the sources with one import added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    ROOT / "libs" / "mlpipe" / "src" / "mlpipe",
    ROOT / "libs" / "mlpipe-ops" / "src" / "mlpipe_ops",
]
SOURCES += sorted((ROOT / "services").glob("*/src/mlpipe_*"))
SOURCES += sorted((ROOT / "jobs").glob("*/src/mlpipe_*"))
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    # Wide enough that no contract's name is wrapped onto two lines.
    env = {**os.environ, "COLUMNS": "400"}
    if pythonpath is not None:
        # First on the path: the copy is what grimp reads, not the installed workspace.
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_contracts_hold() -> None:
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("mlpipe_trainer/start.py", "import mlpipe_ops.infra", "operator distribution"),
        ("mlpipe_trainer/start.py", "import mlpipe_evaluator.metrics", "another service"),
        # The predictor launches the batch job as a process; it never imports it.
        ("mlpipe_predictor/steps.py", "import mlpipe_batch.pipeline", "another service"),
        ("mlpipe_batch/pipeline.py", "import mlpipe_predictor.batch", "another service"),
        ("mlpipe_batch/pipeline.py", "import mlpipe_ops.infra", "operator distribution"),
        ("mlpipe/store/storage.py", "import mlpipe.messaging.events", "layers"),
        ("mlpipe_ingest/landing.py", "import starlette.responses", "web framework"),
        ("mlpipe_ingest/landing.py", "import mlpipe_ingest.main", "adapter module"),
        # The notifier reads other services' events, never their code.
        ("mlpipe_notifier/notices.py", "import mlpipe_deployer.rollout", "another service"),
        ("mlpipe_notifier/delivery.py", "import starlette.responses", "web framework"),
        ("mlpipe_notifier/posting.py", "import mlpipe_notifier.main", "adapter module"),
    ],
)
def test_a_crossing_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    for source in SOURCES:
        shutil.copytree(
            source, tmp_path / source.name, ignore=shutil.ignore_patterns("__pycache__")
        )
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")

    result = lint_imports(tmp_path)

    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if " BROKEN" in row]
    assert len(broken) == 1, result.stdout
    assert contract in broken[0]
