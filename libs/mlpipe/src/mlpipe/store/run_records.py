"""What a run's recorded events say: its outcome and its timeline (the CLI's `mlpipe runs` /
`timeline` and the console read runs the same way).

A run's records are written once each (create-if-absent or written last), so which of them
exist tells its state: failed.json, else deployment.json, else evaluation.json, else
training.json, else it is training.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from mlpipe.store.layout import RunPaths
from mlpipe.store.storage import Storage

# The records that decide a run's state, by file name, strongest first.
STATE_RECORDS = ("failed.json", "deployment.json", "evaluation.json", "training.json")


def state_of(names: set[str], deployment: dict[str, Any] | None = None) -> str:
    """A run's state from the names of its records (`runs/<id>/<name>`); `deployment` (its
    deployment.json) tells "deployed" from "not deployed"."""
    if "failed.json" in names:
        return "failed"
    if "deployment.json" in names:
        if deployment is None:
            return "deployed"
        return "deployed" if deployment.get("deployed") else "not deployed"
    if "evaluation.json" in names:
        return "evaluated"
    if "training.json" in names:
        return "trained"
    return "training"


def failed_stage(failed: dict[str, Any]) -> str:
    """The stage a failed.json (a PipelineFailed as JSON) names: its `pipeline_stage` enum
    ("PIPELINE_STAGE_TRAINER" → "trainer"), or the old `stage` string of older records."""
    stage = str(failed.get("pipeline_stage", "")).removeprefix("PIPELINE_STAGE_").lower()
    return stage or str(failed.get("stage", "")) or "?"


def run_outcome(storage: Storage, run_id: str) -> dict[str, Any]:
    """{"run_id", "state", "pipeline", "detail"} of one run, from its records."""
    paths = RunPaths(run_id)
    row: dict[str, Any] = {"run_id": run_id, "state": "training"}
    lineage = storage.read_json(paths.lineage) or {}
    row["pipeline"] = lineage.get("dataset", {}).get("name", "")
    if (failed := storage.read_json(paths.failed)) is not None:
        row.update(state="failed", detail=f"{failed_stage(failed)}: {failed.get('reason')}")
    elif (done := storage.read_json(paths.deployment)) is not None:
        row.update(
            state="deployed" if done.get("deployed") else "not deployed",
            detail=f"v{done.get('version', 0)}" if done.get("deployed") else done.get("reason", ""),
        )
    elif (evaluated := storage.read_json(paths.evaluation)) is not None:
        row.update(state="evaluated", detail="passed" if evaluated.get("passed") else "failed")
    elif storage.exists(paths.training):
        row["state"] = "trained"
    return row


def when(value: Any) -> dt.datetime | None:
    """A recorded timestamp (RFC 3339, 'Z' or offset) as an aware datetime; None if absent."""
    if not value:
        return None
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def timeline_of(records: dict[str, dict[str, Any]]) -> list[tuple[str, dt.datetime]]:
    """The run's hops, in time order, from its records by file name (started.json,
    training.json, evaluation.json, deployment.json)."""
    started = records.get("started.json") or {}
    trained = records.get("training.json") or {}
    evaluated = records.get("evaluation.json") or {}
    deployed = records.get("deployment.json") or {}
    failed = records.get("failed.json") or {}
    first = started or trained
    # A run promoted from another environment: its training happened there; the promotion
    # recorded its TrainingCompleted here (docs/promotion.md).
    promoted = trained.get("promoted_from") or {}
    points = [
        ("requested", first.get("context", {}).get("requested_at")),
        ("landed in GCS", first.get("dataset", {}).get("landed_at")),
        ("training job started", started.get("context", {}).get("event_time")),
        ("fit started", trained.get("started_at")),
        ("model written", trained.get("finished_at")),
        (
            f"promoted from {promoted.get('env', '?')} v{promoted.get('version', '?')}",
            trained.get("context", {}).get("event_time") if promoted else None,
        ),
        ("evaluated", evaluated.get("context", {}).get("event_time")),
        (
            "deployed" if deployed.get("deployed") else "deployment decided",
            deployed.get("context", {}).get("event_time"),
        ),
        (f"failed ({failed_stage(failed)})", failed.get("context", {}).get("event_time")),
    ]
    hops = [(label, at) for label, value in points if (at := when(value))]
    return sorted(hops, key=lambda hop: hop[1])


def run_timeline(storage: Storage, run_id: str) -> list[tuple[str, dt.datetime]]:
    """The run's hops from the events its steps recorded, in time order."""
    paths = RunPaths(run_id)
    records = {
        "started.json": storage.read_json(paths.started) or {},
        "training.json": storage.read_json(paths.training) or {},
        "evaluation.json": storage.read_json(paths.evaluation) or {},
        "deployment.json": storage.read_json(paths.deployment) or {},
    }
    return timeline_of(records)
