"""The training job's work: read the exact dataset bytes, split, fit, write the run's artifacts.

Pure of transport: it reads and writes through `Storage` and returns the TrainingCompleted
event; `job.py` publishes it. Every check that can fail runs before anything is written, so a
failed run leaves no half-written artifacts.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

from mlpipe import tracing
from mlpipe.errors import PermanentError
from mlpipe.faults import fault_point
from mlpipe.messaging import events
from mlpipe.ml.config import PipelineConfig, load_run_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.modeling import build_pipeline, bundle_bytes, model_bundle
from mlpipe.ml.split import split_rows
from mlpipe.ml.validation import check_dataset
from mlpipe.store import layout
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)


def fetch_dataset(storage: Storage, dataset: events_pb2.DatasetRef) -> bytes:
    obj = storage.read(storage.path_of(dataset.uri), generation=dataset.generation or None)
    if obj is None:
        raise PermanentError(
            "dataset_missing", f"{dataset.uri}#{dataset.generation} no longer exists"
        )
    actual = sha256_hex(obj.data)
    if dataset.sha256 and actual != dataset.sha256:
        raise PermanentError(
            "sha256_mismatch",
            f"{dataset.uri}#{dataset.generation} has sha256 {actual}, expected {dataset.sha256}",
        )
    return obj.data


def train(
    storage: Storage,
    started: events_pb2.TrainingStarted,
    code_version: str,
    before_write: Callable[[], None] = lambda: None,
) -> events_pb2.TrainingCompleted:
    began = dt.datetime.now(dt.UTC)
    run_id = started.context.run_id
    paths = layout.RunPaths(run_id)
    config: PipelineConfig = load_run_config(storage, run_id)
    with tracing.span("read and check the dataset", attributes={"gcs.uri": started.dataset.uri}):
        data = fetch_dataset(storage, started.dataset)
        fmt = events.data_format(started.dataset) or "csv"
        frame = read_dataset(data, fmt, started.dataset.uri)
        features = check_dataset(frame, config, started.dataset.uri)
        split = split_rows(frame, config)
    estimator = build_pipeline(config, features)

    train_frame = frame.iloc[split.train]
    y_train = train_frame[config.dataset.target]
    if config.model.task == "classification" and y_train.nunique() < 2:
        raise PermanentError(
            "single_class",
            f"the training split of {started.dataset.uri} has only class "
            f"{y_train.iloc[0]!r} in {config.dataset.target!r}; a classifier needs two or more",
        )
    t0 = time.perf_counter()
    with tracing.span(
        "fit", attributes={"mlpipe.estimator": config.model.estimator, "rows": len(split.train)}
    ):
        try:
            estimator.fit(train_frame[features], y_train)
        except (ValueError, TypeError) as exc:
            message = f"{config.model.estimator}.fit failed: {exc}"
            raise PermanentError("fit_failed", message) from exc
    fit_seconds = time.perf_counter() - t0

    model_bytes = bundle_bytes(model_bundle(estimator, config, features, run_id))
    model_sha = sha256_hex(model_bytes)

    fault_point("job.before_artifacts")
    before_write()
    storage.write(paths.model, model_bytes)
    fault_point("job.after_model")
    storage.write_json(paths.split, split.to_json())
    lineage_record = {
        "run_id": run_id,
        "dataset": events.to_dict(started.dataset) | {"rows": len(frame)},
        "config_sha256": started.context.config_sha256,
        "config_uri": storage.uri(paths.config),
        "code_version": code_version,
        "request_id": started.context.request_id,
        "model": {
            "uri": storage.uri(paths.model),
            "sha256": model_sha,
            "estimator": config.model.estimator,
            "params": config.model.params,
        },
        "features": features,
        "target": config.dataset.target,
        "split": {
            "uri": storage.uri(paths.split),
            "seed": split.seed,
            "stratified": split.stratified,
            "strategy": split.strategy,
            "cutoff": split.cutoff,
            "train_rows": len(split.train),
            "holdout_rows": len(split.holdout),
        },
        "trained_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    storage.write_json(paths.lineage, lineage_record)

    ctx = events.next_context(started.context, producer="training-job", code_version=code_version)
    completed = events_pb2.TrainingCompleted(
        context=ctx,
        dataset=started.dataset,
        model_uri=storage.uri(paths.model),
        model_sha256=model_sha,
        model_name=config.model.name,
        model_task=events.MODEL_TASK.of(config.model.task),
        estimator=config.model.estimator,
        train_rows=len(split.train),
        holdout_rows=len(split.holdout),
        split_uri=storage.uri(paths.split),
        lineage_uri=storage.uri(paths.lineage),
        fit_seconds=fit_seconds,
        started_at=events.timestamp(began),
        finished_at=events.timestamp(),
    )
    completed.dataset.row_count = len(frame)
    log.info(
        "trained %s on %d rows in %.3fs", config.model.estimator, len(split.train), fit_seconds
    )
    return completed
