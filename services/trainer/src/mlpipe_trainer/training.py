"""The training job's work: read the exact dataset bytes, split, fit, write the run's artifacts.

Pure of transport: it reads and writes through `Storage` and returns the TrainingCompleted
event; `job.py` publishes it. Every check that can fail runs before anything is written, so a
failed run leaves no half-written artifacts.
"""

from __future__ import annotations

import datetime as dt
import importlib
import io
import logging
import time
from typing import Any

import joblib
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from mlpipe import events, lineage
from mlpipe.config import ModelSpec, PipelineConfig, load_run_config
from mlpipe.data import check_columns, read_dataset, split_rows
from mlpipe.errors import PermanentError
from mlpipe.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)


def build_estimator(spec: ModelSpec) -> Any:
    module_name, _, class_name = spec.estimator.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise PermanentError("invalid_estimator", f"cannot import {spec.estimator}: {exc}") from exc
    try:
        return cls(**spec.params)
    except TypeError as exc:
        raise PermanentError(
            "invalid_estimator", f"{spec.estimator} rejects params {spec.params}: {exc}"
        ) from exc


def build_pipeline(config: PipelineConfig, features: list[str]) -> Pipeline:
    """Preprocessing from the column types, then the configured estimator."""
    prep = config.model.preprocessing
    numeric = [c for c in features if config.dataset.column_type(c) == "numeric"]
    categorical = [c for c in features if config.dataset.column_type(c) == "categorical"]
    numeric_steps: list[tuple[str, Any]] = []
    if prep.impute != "none":
        numeric_steps.append(("impute", SimpleImputer(strategy=prep.impute)))
    if prep.scale:
        numeric_steps.append(("scale", StandardScaler()))
    transformers: list[tuple[str, Any, list[str]]] = []
    if numeric:
        numeric_step = Pipeline(numeric_steps) if numeric_steps else "passthrough"
        transformers.append(("numeric", numeric_step, numeric))
    if categorical:
        encoder: Any = (
            OneHotEncoder(handle_unknown="ignore", sparse_output=False)
            if prep.one_hot
            else OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)
        )
        steps = [("impute", SimpleImputer(strategy="most_frequent")), ("encode", encoder)]
        transformers.append(("categorical", Pipeline(steps), categorical))
    columns = ColumnTransformer(transformers, remainder="drop", verbose_feature_names_out=False)
    return Pipeline([("preprocess", columns), ("model", build_estimator(config.model))])


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
    storage: Storage, started: events_pb2.TrainingStarted, code_version: str
) -> events_pb2.TrainingCompleted:
    began = dt.datetime.now(dt.UTC)
    run_id = started.context.run_id
    paths = lineage.RunPaths(run_id)
    config: PipelineConfig = load_run_config(storage, run_id)
    data = fetch_dataset(storage, started.dataset)
    frame = read_dataset(data, started.dataset.format or "csv", started.dataset.uri)
    features = check_columns(frame, config, started.dataset.uri)
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
    try:
        estimator.fit(train_frame[features], y_train)
    except (ValueError, TypeError) as exc:
        raise PermanentError("fit_failed", f"{config.model.estimator}.fit failed: {exc}") from exc
    fit_seconds = time.perf_counter() - t0

    bundle = {
        "estimator": estimator,
        "features": features,
        "target": config.dataset.target,
        "task": config.model.task,
        "run_id": run_id,
        "feature_types": {c: config.dataset.column_type(c) for c in features},
        "classes": [str(c) for c in getattr(estimator, "classes_", [])],
    }
    buffer = io.BytesIO()
    joblib.dump(bundle, buffer)
    model_bytes = buffer.getvalue()
    model_sha = sha256_hex(model_bytes)

    storage.write(paths.model, model_bytes)
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
        task=config.model.task,
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
