"""What a service imports to start: a cloud client it may never use is imported on first use.

The Vertex AI client alone takes about 5 s of CPU to import; the deployer (local target) and
the trainer (local backend) would pay it at every start of the local stack.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CLOUD_CLIENTS = (
    "google.cloud.aiplatform_v1",
    "google.cloud.aiplatform",
    "google.cloud.run_v2",
    "google.cloud.bigquery",
)


@pytest.mark.parametrize(
    "modules",
    [
        ("mlpipe_deployer.main", "mlpipe_deployer.targets.configured"),
        ("mlpipe_trainer.main", "mlpipe_trainer.vertex"),
        ("mlpipe_ingest.main", "mlpipe_ingest.settings"),
    ],
)
def test_starting_imports_no_cloud_client(modules: tuple[str, ...]) -> None:
    probe = (
        f"import sys, {', '.join(modules)};"
        f"print(sorted(m for m in {CLOUD_CLIENTS!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )

    assert done.stdout.strip() == "[]"


def test_the_evaluator_starts_without_matplotlib() -> None:
    # matplotlib is imported when a report is drawn, after the verdict is published.
    probe = (
        "import sys, mlpipe_evaluator.main, mlpipe_evaluator.evaluation;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )

    assert done.stdout.strip() == "[]"


def test_the_cli_starts_without_the_data_stack() -> None:
    # Every `mlpipe` command (`mlpipe up` first) imports the whole CLI: pandas and scikit-learn
    # (promotion's holdout), duckdb and pyarrow (the BigQuery stand-in) are imported by the
    # commands that use them.
    heavy = ("pandas", "sklearn", "duckdb", "pyarrow", "numpy", "google.cloud.aiplatform")
    probe = f"import sys, mlpipe_ops.cli;print(sorted(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )

    assert done.stdout.strip() == "[]"
