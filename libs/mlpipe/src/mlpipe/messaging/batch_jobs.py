"""The contract between the predictor, which launches a batch job, and the job (mlpipe_batch),
which neither imports the other: what a job is asked to do (`JobSpec`, passed as JSON), the
record of why it failed, and the BatchPredictionCompleted built from its metrics.

    predictions/<model>/jobs/<batch_id>.json          the job started (the predictor, once)
    predictions/<model>/jobs/<batch_id>.failed.json   why it failed (the job; first wins)
    predictions/<model>/metrics/<batch_id>.json       its metrics: the batch is done
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from mlpipe.messaging import events
from mlpipe.store import layout
from mlpipe.store.storage import Storage
from mlpipe.v1 import events_pb2

REJECT_BATCH = "reject_batch"
WRITE_REJECTED = "write_rejected"


@dataclass(frozen=True)
class JobSpec:
    """One batch job: everything resolved when it is launched (the version, the output's day)."""

    project: str
    bucket: str
    batch_id: str
    model: str
    version: int
    input_uri: str
    output_prefix: str  # bucket path, layout.batch_job_output_prefix
    key_column: str = ""
    chunk_rows: int = 10_000
    bad_rows: str = REJECT_BATCH
    code_version: str = "dev"
    request: str = ""  # the BatchPredictionRequest, JSON (its context goes into the event)
    launched_at: str = ""
    publish: bool = True  # publish BatchPredictionCompleted after the metrics

    def __post_init__(self) -> None:
        if self.bad_rows not in (REJECT_BATCH, WRITE_REJECTED):
            raise ValueError(f"bad_rows must be {REJECT_BATCH} or {WRITE_REJECTED}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls(**json.loads(text))

    @property
    def job_path(self) -> str:
        return layout.batch_job_path(self.model, self.batch_id)

    @property
    def failure_path(self) -> str:
        return layout.batch_job_failure_path(self.model, self.batch_id)

    @property
    def metrics_path(self) -> str:
        return layout.batch_metrics_path(self.model, self.batch_id)

    def uri(self, path: str) -> str:
        return f"gs://{self.bucket}/{path}"

    def context(self) -> events_pb2.RunContext:
        if not self.request:
            return events_pb2.RunContext()
        return events.from_json(events_pb2.BatchPredictionRequest, self.request.encode()).context


def record_failure(
    storage: Storage, spec: JobSpec, reason: str, message: str, **detail: Any
) -> dict[str, Any]:
    """Record why the job failed unless another part of it recorded first; return the record
    that stands."""
    record = {
        "batch_id": spec.batch_id,
        "model": spec.model,
        "reason": reason,
        "message": message,
        "at": dt.datetime.now(dt.UTC).isoformat(),
        **detail,
    }
    data = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
    if storage.create_if_absent(spec.failure_path, data) is None:
        return storage.read_json(spec.failure_path) or record
    return record


def completed_event(
    metrics: dict[str, Any],
    *,
    context: events_pb2.RunContext,
    producer: str,
    code_version: str,
) -> events_pb2.BatchPredictionCompleted:
    """The BatchPredictionCompleted a batch's metrics describe (the job's and the predictor's)."""
    ctx = events.next_context(context, producer=producer, code_version=code_version)
    rows = int(metrics.get("rows", 0))
    # The in-process scorer writes bad rows into the output with their error (invalid_rows).
    rejected = int(metrics.get("rejected_rows", metrics.get("invalid_rows", 0)))
    return events_pb2.BatchPredictionCompleted(
        context=ctx,
        batch_id=str(metrics["batch_id"]),
        model_name=str(metrics["model"]),
        model_version=int(metrics["model_version"]),
        input_uri=str(metrics.get("input_uri", "")),
        output_uris=list(metrics.get("output_uris") or [metrics.get("output_uri", "")]),
        rows=rows,
        scored_rows=int(metrics.get("scored_rows", rows - rejected)),
        rejected_uris=list(metrics.get("rejected_uris", [])),
        rejected_rows=rejected,
        duration_seconds=float(metrics.get("duration_seconds", 0.0)),
        metrics_uri=str(metrics.get("metrics_uri", "")),
        runner=str(metrics.get("runner", "in-process")),
    )
