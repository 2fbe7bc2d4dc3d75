"""Run identity and lineage rules.

A run is one (dataset content, pipeline config) pair: its id is derived from the dataset's
sha256 and the config's hash, so the same bytes under the same config always give the same
run, whoever delivers them and however often.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{16}\Z")
DATASET_PATH = re.compile(
    r"^datasets/(?P<name>[a-z][a-z0-9_-]{0,62})/dt=(?P<date>\d{4}-\d{2}-\d{2})/"
    r"(?P<id>[^/]+)\.(?P<ext>csv|parquet)\Z"
)


def run_id_for(dataset_sha256: str, config_sha256: str) -> str:
    digest = hashlib.sha256(f"{dataset_sha256}:{config_sha256}".encode()).hexdigest()
    return digest[:16]


def dataset_path(name: str, day: dt.date, dataset_id: str, ext: str) -> str:
    return f"datasets/{name}/dt={day.isoformat()}/{dataset_id}.{ext}"


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}/"


class RunPaths:
    """Where a run's artifacts live: `runs/<run_id>/...`."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        base = run_prefix(run_id)
        self.claim = base + "claim.json"
        self.config = base + "config.json"  # the config snapshot the run is keyed on
        self.started = base + "started.json"  # the TrainingStarted event
        self.model = base + "model.joblib"
        self.split = base + "split.json"
        self.lineage = base + "lineage.json"
        self.training = base + "training.json"  # the TrainingCompleted event, written last
        self.metrics = base + "metrics.json"
        self.report = base + "report.html"
        self.evaluation = base + "evaluation.json"  # the EvaluationCompleted event
        self.deployment = base + "deployment.json"  # the DeploymentCompleted event
        self.failed = base + "failed.json"  # the PipelineFailed event of a failed run
        self.job_log = base + "job.log"
