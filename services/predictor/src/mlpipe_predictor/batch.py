"""Batch prediction: score a dataset in GCS with a model version, chunk by chunk.

    predictions/<model>/dt=YYYY-MM-DD/<batch_id>.avro   one record per input row
    predictions/<model>/metrics/<batch_id>.json         rows, duration, version: written last

(mlpipe.store.layout builds both paths.)

The input is read as a stream (CSV in chunks, Parquet in record batches) and the Avro file
is written as the chunks are scored, so memory holds one chunk at a time. The Avro object is
uploaded whole once complete (GCS makes it visible atomically); the metrics file, written
after it, marks the batch done, so a redelivered request finds it and does not score again.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import fastavro
import pandas as pd

from mlpipe.errors import PermanentError
from mlpipe.ml.data import read_dataset_chunks
from mlpipe.ml.scoring import (
    LoadedModel,
    check_rows,
    load_version,
    prediction_schema,
    score_checked,
)
from mlpipe.store import layout
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.store.storage import Storage, check_name_part
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 10_000


def avro_schema(task: str) -> dict[str, Any]:
    return prediction_schema(task)


def check_request(request: events_pb2.BatchPredictionRequest) -> None:
    try:
        check_name_part(request.batch_id, "batch_id")
        check_name_part(request.model_name, "model_name")
    except ValueError as exc:
        raise PermanentError("invalid_batch_request", str(exc)) from None
    if not request.input_uri.startswith("gs://"):
        raise PermanentError(
            "invalid_batch_request", f"input_uri must be gs://..., not {request.input_uri!r}"
        )


def _chunks(storage: Storage, path: str, rows: int) -> Iterator[pd.DataFrame]:
    blob = storage.bucket.blob(path)
    if not blob.exists():
        raise PermanentError("dataset_missing", f"{storage.uri(path)} does not exist")
    fmt = "parquet" if path.endswith(".parquet") else "csv"
    with blob.open("rb") as stream:
        yield from read_dataset_chunks(stream, fmt, storage.uri(path), rows)


def _score_chunk(
    model: LoadedModel, chunk: pd.DataFrame, key_column: str, first_row: int, source: str
) -> list[dict[str, Any]]:
    checked = check_rows(model, chunk, key_column, first_row, source)
    predictions = score_checked(model, checked)
    return [
        {
            "key": key,
            "prediction": prediction,
            "error": problem or None,
            "model": model.name,
            "model_version": model.version,
        }
        for key, prediction, problem in zip(
            checked.keys, predictions, checked.problems.tolist(), strict=True
        )
    ]


def run_batch(
    storage: Storage,
    registry: Registry,
    request: events_pb2.BatchPredictionRequest,
    *,
    loaded: LoadedModel | None = None,
    default_chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, Any]:
    """Score the request's input; return the metrics record written beside the output."""
    check_request(request)
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.UTC)
    model_name = request.model_name
    version = request.version or registry.alias(model_name, CHAMPION)
    if not version:
        raise PermanentError("no_model", f"{model_name} has no champion to score with")
    model = (
        loaded
        if loaded is not None and loaded.version == version
        else load_version(registry, model_name, version)
    )
    input_path = storage.path_of(request.input_uri)
    output = layout.batch_output_path(model_name, started_at.date(), request.batch_id)
    chunk_rows = int(request.chunk_rows or default_chunk_rows)
    counts = {"rows": 0, "invalid_rows": 0, "chunks": 0}

    def records() -> Iterator[dict[str, Any]]:
        for chunk in _chunks(storage, input_path, chunk_rows):
            scored = _score_chunk(
                model, chunk, request.key_column, counts["rows"], request.input_uri
            )
            counts["rows"] += len(scored)
            counts["chunks"] += 1
            counts["invalid_rows"] += sum(1 for r in scored if r["error"])
            yield from scored

    with tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024) as out:
        fastavro.writer(
            out,
            fastavro.parse_schema(avro_schema(model.task)),
            records(),
            codec="deflate",
            metadata={"mlpipe.model": model_name, "mlpipe.model_version": str(model.version)},
        )
        out.seek(0)
        storage.bucket.blob(output).upload_from_file(out, content_type="application/avro")
    duration = time.perf_counter() - started
    metrics = {
        "batch_id": request.batch_id,
        "model": model_name,
        "model_version": model.version,
        "runtime": model.runtime,
        "run_id": model.run_id,
        "input_uri": request.input_uri,
        "output_uri": storage.uri(output),
        "rows": counts["rows"],
        "invalid_rows": counts["invalid_rows"],
        "chunks": counts["chunks"],
        "chunk_rows": chunk_rows,
        "duration_seconds": round(duration, 4),
        "rows_per_second": round(counts["rows"] / duration, 1) if duration > 0 else None,
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    storage.write_json(layout.batch_metrics_path(model_name, request.batch_id), metrics)
    log.info(
        "batch %s: %d rows scored by %s v%d in %.2fs",
        request.batch_id,
        counts["rows"],
        model_name,
        model.version,
        duration,
    )
    return metrics
