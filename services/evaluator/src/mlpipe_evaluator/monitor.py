"""The drift check: MonitoringRequest (a schedule, `mlpipe monitor check`) → drift.json and
drift.html under `monitoring/<model>/reports/<check_id>/`, and on drift a DriftDetected event
and, when the pipeline allows it, a retraining IngestRequest.

Reference: the champion's training rows (its dataset bytes, verified, and `split.json`) and
the champion's predictions on them. Current: the inputs the predictor logged in the last
`monitoring.window_hours` (`monitoring/<model>/dt=YYYY-MM-DD/*.jsonl`) and its predictions.

Retraining lands the champion's dataset plus the labelled rows under
`monitoring.retrain.labels_prefix`, through ingest's `gcs` source, so the usual chain trains,
gates against the champion and deploys only if better. Loops are bounded by markers created
with preconditions (never read-then-write): one per cool-down period, and `max_per_window`
numbered slots per window.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import MonitoringSpec, PipelineConfig, load_pipeline_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.split import Split
from mlpipe.store import layout
from mlpipe.store.registry import CHAMPION, ModelVersion, Registry
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_evaluator import drift

log = logging.getLogger(__name__)

PREDICTION = "prediction"
CHECK_ID = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class CheckResult:
    status: str  # "drift", "stable" or "not_enough_data"
    report: dict[str, Any]
    event: events_pb2.DriftDetected | None = None


def served_inputs(storage: Storage, model: str, since: dt.datetime) -> pd.DataFrame:
    """Rows the predictor logged since `since`: one column per feature, plus `prediction`."""
    day = since.date()
    today = dt.datetime.now(dt.UTC).date()
    records: list[dict[str, Any]] = []
    while day <= today:
        for path in storage.list(layout.prediction_log_prefix(model, day)):
            obj = storage.read(path)
            if obj is None:
                continue
            for line in obj.data.decode().splitlines():
                try:
                    record = json.loads(line)
                    when = dt.datetime.fromisoformat(record["time"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn or foreign line says nothing about drift
                if when >= since:
                    row = {**record.get("instance", {}), PREDICTION: record.get(PREDICTION)}
                    records.append(row)
        day += dt.timedelta(days=1)
    return pd.DataFrame.from_records(records)


def training_rows(storage: Storage, champion: ModelVersion) -> tuple[pd.DataFrame, bytes, str]:
    """(the champion's training rows, its dataset bytes, their format), verified by sha256."""
    ref = champion.info.get("dataset", {})
    uri, sha, fmt = ref.get("uri", ""), ref.get("sha256", ""), ref.get("format") or "csv"
    generation = int(ref["generation"]) if ref.get("generation") else None
    obj = storage.read(storage.path_of(uri), generation=generation) if uri else None
    if obj is None or (sha and sha256_hex(obj.data) != sha):
        raise PermanentError(
            "reference_missing",
            f"{champion.model} v{champion.version}'s training data {uri or '(none recorded)'} "
            "is missing or differs from its sha256",
        )
    split_doc = storage.read_json(layout.RunPaths(champion.run_id).split)
    if split_doc is None:
        raise PermanentError("reference_missing", f"run {champion.run_id} has no split.json")
    frame = read_dataset(obj.data, fmt, uri)
    return frame.iloc[Split.from_json(split_doc).train], obj.data, fmt


def claim_retrain(
    storage: Storage, model: str, spec: MonitoringSpec, now: dt.datetime, check_id: str
) -> tuple[bool, str]:
    """Take a retrain slot, or say why none is left (cool-down, or the window's maximum)."""
    retrain = spec.retrain
    marker = json.dumps({"check_id": check_id, "at": now.isoformat()}).encode()
    period = int(now.timestamp() // (retrain.cooldown_minutes * 60))

    def take(path: str) -> bool:
        if storage.create_if_absent(path, marker) is not None:
            return True
        # Taken: by this same check (a redelivery after a crash) counts as ours.
        held = storage.read_json(path)
        return bool(held and held.get("check_id") == check_id)

    refused = (
        False,
        f"cool-down: a drift retrain already started in the last {retrain.cooldown_minutes} "
        "minutes",
    )
    cooldown_slot = layout.retrain_cooldown_slot(model, period)
    if not take(cooldown_slot):
        return refused
    # Periods are aligned to the clock: a retrain just before the boundary still counts.
    previous = storage.read_json(layout.retrain_cooldown_slot(model, period - 1))
    if previous and previous.get("check_id") != check_id:
        since = now - dt.datetime.fromisoformat(previous["at"])
        if since < dt.timedelta(minutes=retrain.cooldown_minutes):
            storage.delete(cooldown_slot)  # ours, just made: leave the period to a later check
            return refused
    window = int(now.timestamp() // (retrain.window_hours * 3600))
    for slot in range(retrain.max_per_window):
        if take(layout.retrain_window_slot(model, window, slot)):
            return True, (
                f"retrain {slot + 1} of at most {retrain.max_per_window} in this "
                f"{retrain.window_hours}-hour window"
            )
    return False, (
        f"limit: {retrain.max_per_window} drift retrains already in this "
        f"{retrain.window_hours}-hour window"
    )


def labelled_rows(storage: Storage, prefix: str, columns: list[str]) -> pd.DataFrame:
    frames = []
    for path in sorted(storage.list(prefix)):
        if not path.endswith(".csv"):
            continue
        obj = storage.read(path)
        if obj is None:
            continue
        try:
            frame = read_dataset(obj.data, "csv", obj.uri)
        except PermanentError as exc:
            if exc.reason in ("empty_dataset", "header_only"):
                continue  # a labels file with no rows yet adds none
            raise
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise PermanentError(
                "labels_missing_column",
                f"labelled rows {storage.uri(path)} lack column(s) {missing}",
            )
        frames.append(frame[columns])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def retrain_request(
    storage: Storage,
    config: PipelineConfig,
    dataset: bytes,
    fmt: str,
    check_id: str,
) -> tuple[events_pb2.IngestRequest | None, str]:
    """The retraining IngestRequest (its data written first), or why there is none."""
    prefix = config.monitoring.retrain.labels_prefix
    if not prefix:
        return None, (
            "no labels source (monitoring.retrain.labels_prefix): retraining would land the "
            "same rows"
        )
    original = read_dataset(dataset, fmt, "champion dataset")
    labels = labelled_rows(storage, prefix, list(original.columns))
    # Rows an earlier retrain already added are in the champion's dataset: only new ones count.
    known = original.astype(str).apply(tuple, axis=1)
    labels = labels[~labels.astype(str).apply(tuple, axis=1).isin(set(known))]
    if labels.empty:
        return None, f"no new labelled rows under {storage.uri(prefix)}"
    combined = pd.concat([original, labels], ignore_index=True)
    path = layout.retrain_data_path(config.model.name, check_id)
    storage.write(path, combined.to_csv(index=False).encode(), content_type="text/csv")
    request = events_pb2.IngestRequest(
        request_id=f"drift-{check_id}",
        dataset=config.name,
        requested_at=events.timestamp(),
    )
    request.gcs.uri = storage.uri(path)
    request.gcs.format = "csv"
    return (
        request,
        f"{len(original)} rows of the champion's dataset + {len(labels)} new labelled rows",
    )


def _proto(d: drift.Drift) -> events_pb2.FeatureDrift:
    return events_pb2.FeatureDrift(
        name=d.name,
        kind=d.kind,
        psi=d.psi,
        ks_statistic=0.0 if d.ks_statistic != d.ks_statistic else d.ks_statistic,
        ks_pvalue=0.0 if d.ks_pvalue != d.ks_pvalue else d.ks_pvalue,
        drifted=d.drifted,
        reason=d.reason,
    )


def check(
    storage: Storage,
    publisher: Publisher,
    code_version: str,
    request: events_pb2.MonitoringRequest,
    load_bundle: Any,
) -> CheckResult:
    """Run one drift check; see the module docstring. `load_bundle(registry, version)` gives
    the champion's verified, unpickled bundle."""
    if not request.pipeline:
        raise PermanentError("invalid_message", "MonitoringRequest has no pipeline")
    config = load_pipeline_config(storage, request.pipeline)
    spec = config.monitoring
    model = config.model.name
    now = dt.datetime.now(dt.UTC)
    check_id = CHECK_ID.sub("-", request.request_id)[:64] or now.strftime("%Y%m%dT%H%M%S")
    paths = layout.DriftCheckPaths(model, check_id)
    recorded = storage.read_json(paths.report)
    if recorded is not None:  # a redelivery: the check is done; say it again
        held = storage.read(paths.event)
        found = events.from_json(events_pb2.DriftDetected, held.data) if held else None
        if found is not None:
            publisher.publish(found)
        return CheckResult(recorded["status"], recorded, found)

    registry = Registry(storage)
    version = registry.alias(model, CHAMPION)
    champion = registry.get(model, version) if version else None
    if champion is None:
        raise PermanentError("no_champion", f"{model} has no champion to check")
    bundle = load_bundle(registry, champion)
    features: list[str] = list(bundle["features"])
    kinds = {
        f: "categorical" if bundle.get("feature_types", {}).get(f) == "categorical" else "numeric"
        for f in features
    }
    reference, dataset, fmt = training_rows(storage, champion)
    window = request.window_hours or spec.window_hours
    current = served_inputs(storage, model, now - dt.timedelta(hours=window))

    summary: dict[str, Any] = {
        "check_id": check_id,
        "pipeline": config.name,
        "model": model,
        "version": champion.version,
        "run_id": champion.run_id,
        "checked_at": now.isoformat(),
        "window_hours": window,
        "served_samples": len(current),
        "reference_rows": len(reference),
        "thresholds": spec.model_dump(mode="json", exclude={"retrain"}),
    }
    if len(current) < spec.min_samples:
        summary |= {
            "status": "not_enough_data",
            "verdict": f"no verdict: {len(current)} served rows in the last {window:g} h, "
            f"fewer than monitoring.min_samples ({spec.min_samples})",
            "features": [],
        }
        storage.write_json(paths.report, summary)
        storage.write(
            paths.page,
            drift.render_html(summary, [], None).encode(),
            content_type="text/html",
        )
        return CheckResult("not_enough_data", summary)

    drifts = drift.compare(reference, current, kinds, spec)
    reference_predictions = list(bundle["estimator"].predict(reference[features]))
    if config.model.task == "classification":
        prediction = drift.categorical_drift(
            PREDICTION,
            reference_predictions,
            current[PREDICTION],
            spec.prediction_psi_threshold,
        )
    else:
        prediction = drift.numeric_drift(
            PREDICTION,
            reference_predictions,
            current[PREDICTION],
            spec.model_copy(update={"psi_threshold": spec.prediction_psi_threshold}),
        )
    drifted = [d.name for d in [*drifts, prediction] if d.drifted]
    status = "drift" if drifted else "stable"
    summary |= {
        "status": status,
        "verdict": (
            f"drift in {', '.join(drifted)}" if drifted else "no feature crossed a threshold"
        ),
        "drifted": drifted,
        "features": [d.to_json() for d in drifts],
        "prediction": prediction.to_json(),
    }

    event: events_pb2.DriftDetected | None = None
    if drifted:
        event = events_pb2.DriftDetected(
            context=events.context(
                producer="evaluator",
                code_version=code_version,
                run_id=champion.run_id,
                pipeline=config.name,
                config_sha256=str(champion.info.get("config_sha256", "")),
                request_id=request.request_id,
            ),
            model_name=model,
            version=champion.version,
            check_id=check_id,
            served_samples=len(current),
            reference_rows=len(reference),
            features=[_proto(d) for d in drifts],
            prediction=_proto(prediction),
            report_uri=storage.uri(paths.page),
            checked_at=events.timestamp(now),
        )
        retrain = None
        if not spec.retrain.enabled:
            note = "retraining on drift is off (monitoring.retrain.enabled)"
        else:
            retrain, note = retrain_request(storage, config, dataset, fmt, check_id)
            if retrain is not None:
                allowed, why = claim_retrain(storage, model, spec, now, check_id)
                note = f"{note}; {why}"
                if not allowed:
                    retrain = None
        if retrain is not None:
            publisher.publish(retrain, attributes={"request_id": retrain.request_id})
            event.retrain_request_id = retrain.request_id
        event.retrain_note = note
        summary |= {"retrain_request_id": event.retrain_request_id, "retrain_note": note}

    if event is not None:
        # The event is recorded before it is published and the report is written last, so a
        # redelivery after a crash either redoes the check or re-publishes this same event.
        if storage.create_if_absent(paths.event, events.to_json(event).encode()) is None:
            first = storage.read(paths.event)
            if first is not None:
                event = events.from_json(events_pb2.DriftDetected, first.data)
        publisher.publish(event)
        log.warning(
            "drift in %s v%d: %s; %s",
            model,
            champion.version,
            ", ".join(drifted),
            event.retrain_note,
        )
    else:
        log.info("no drift in %s v%d (%d served rows)", model, champion.version, len(current))
    storage.write(
        paths.page,
        drift.render_html(summary, drifts, prediction).encode(),
        content_type="text/html",
    )
    storage.write_json(paths.report, summary)
    return CheckResult(status, summary, event)
