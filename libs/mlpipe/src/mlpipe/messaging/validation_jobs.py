"""The contract between ingest, which launches the validation of a large landing, and the job
that runs it (mlpipe_batch.validate), which neither imports the other: what the job is asked
to check (`ValidationSpec`, passed as JSON like a batch job's spec) and its verdict.

    ingest/exports/<export_id>/validation.json   the job started (ingest, once)
    ingest/exports/<export_id>/verdict.json      its verdict (the job; first wins)

A verdict is `valid` with the object's row count, columns and sha256, or not, with the
failure's reason, message and the first bad data row (counted from 1; 0 when the problem is
not one row's, a missing column say).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from mlpipe.store import layout
from mlpipe.store.storage import Storage

# The spec's `job`: what `python -m mlpipe_batch --spec` runs (a JobSpec has none: scoring).
VALIDATE_DATASET = "validate_dataset"


@dataclass(frozen=True)
class ValidationSpec:
    project: str
    bucket: str  # the landing bucket: the config, the record and the verdict
    export_id: str
    dataset: str  # the pipeline whose `dataset:` contract is checked
    input_uri: str  # gs://bucket/name of the object
    generation: int  # read pinned to this generation
    format: str  # csv | parquet
    env: str | None = None  # the environment whose config overrides apply
    chunk_rows: int = 50_000
    job: str = VALIDATE_DATASET

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ValidationSpec:
        return cls(**json.loads(text))

    @property
    def job_path(self) -> str:
        return layout.validation_job_path(self.export_id)

    @property
    def verdict_path(self) -> str:
        return layout.validation_verdict_path(self.export_id)


def is_validation(spec_json: str) -> bool:
    """Whether a job's `--spec` asks for a validation (else it is a batch scoring JobSpec)."""
    try:
        return bool(json.loads(spec_json).get("job") == VALIDATE_DATASET)
    except (ValueError, AttributeError):
        return False


def record_verdict(storage: Storage, spec: ValidationSpec, **verdict: Any) -> dict[str, Any]:
    """Write the job's verdict unless one stands; return the verdict that stands."""
    record = {
        "export_id": spec.export_id,
        "input_uri": spec.input_uri,
        "generation": spec.generation,
        "at": dt.datetime.now(dt.UTC).isoformat(),
        **verdict,
    }
    data = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
    if storage.create_if_absent(spec.verdict_path, data) is None:
        return storage.read_json(spec.verdict_path) or record
    return record
