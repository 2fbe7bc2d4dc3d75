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
from google.protobuf import json_format

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import MonitoringSpec, PipelineConfig, load_pipeline_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.split import Split
from mlpipe.runtime.steps import record_and_publish
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


def dataset_of(champion: ModelVersion) -> events_pb2.DatasetRef:
    """The DatasetRef the registry recorded for a version (its JSON, older fields included)."""
    ref = events_pb2.DatasetRef()
    json_format.ParseDict(champion.info.get("dataset", {}), ref, ignore_unknown_fields=True)
    return ref


def training_rows(storage: Storage, champion: ModelVersion) -> tuple[pd.DataFrame, bytes, str]:
    """(the champion's training rows, its dataset bytes, their format), verified by sha256."""
    ref = dataset_of(champion)
    uri, sha, fmt = ref.uri, ref.sha256, events.data_format(ref) or "csv"
    generation = ref.generation or None
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
    the champion's verified, unpickled bundle. The step protocol, by hand: the report is the
    record (written last, so a redelivery after a crash redoes the check or re-publishes the
    recorded DriftDetected), and the event is recorded before it is published."""
    if not request.pipeline:
        raise PermanentError("invalid_message", "MonitoringRequest has no pipeline")
    config = load_pipeline_config(storage, request.pipeline)
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
    measured = measure(storage, config, champion, load_bundle(registry, champion), request, now)
    summary = {"check_id": check_id, **measured.summary}
    event = None
    if measured.drifted:
        event = drift_event(storage, config, champion, measured, request, code_version, check_id)
        retrain_if_allowed(storage, publisher, config, measured, event, now, check_id)
        summary |= {
            "retrain_request_id": event.retrain_request_id,
            "retrain_note": event.retrain_note,
        }
        event = record_and_publish(storage, publisher, paths.event, event, stage="monitor")
        log.warning(
            "drift in %s v%d: %s; %s",
            model,
            champion.version,
            ", ".join(measured.drifted),
            event.retrain_note,
        )
    elif measured.drifts is not None:
        log.info("no drift in %s v%d (%d served rows)", model, champion.version, measured.served)
    page = drift.render_html(summary, measured.drifts or [], measured.prediction)
    storage.write(paths.page, page.encode(), content_type="text/html")
    storage.write_json(paths.report, summary)
    return CheckResult(summary["status"], summary, event)


@dataclass
class Measured:
    """What one drift check found: the summary, and the drifts when there were enough rows."""

    summary: dict[str, Any]
    served: int
    reference_rows: int
    dataset: bytes
    fmt: str
    drifts: list[drift.Drift] | None = None
    prediction: drift.Drift | None = None

    @property
    def drifted(self) -> list[str]:
        found = [*(self.drifts or []), *([self.prediction] if self.prediction else [])]
        return [d.name for d in found if d.drifted]


def measure(
    storage: Storage,
    config: PipelineConfig,
    champion: ModelVersion,
    bundle: dict[str, Any],
    request: events_pb2.MonitoringRequest,
    now: dt.datetime,
) -> Measured:
    """The pure part of a check: the champion's training rows against what it served."""
    spec = config.monitoring
    features: list[str] = list(bundle["features"])
    kinds = {
        f: "categorical" if bundle.get("feature_types", {}).get(f) == "categorical" else "numeric"
        for f in features
    }
    reference, dataset, fmt = training_rows(storage, champion)
    window = request.window_hours or spec.window_hours
    current = served_inputs(storage, config.model.name, now - dt.timedelta(hours=window))
    summary: dict[str, Any] = {
        "pipeline": config.name,
        "model": config.model.name,
        "version": champion.version,
        "run_id": champion.run_id,
        "checked_at": now.isoformat(),
        "window_hours": window,
        "served_samples": len(current),
        "reference_rows": len(reference),
        "thresholds": spec.model_dump(mode="json", exclude={"retrain"}),
    }
    found = Measured(summary, len(current), len(reference), dataset, fmt)
    if len(current) < spec.min_samples:
        summary |= {
            "status": "not_enough_data",
            "verdict": f"no verdict: {len(current)} served rows in the last {window:g} h, "
            f"fewer than monitoring.min_samples ({spec.min_samples})",
            "features": [],
        }
        return found
    found.drifts = drift.compare(reference, current, kinds, spec)
    found.prediction = prediction_drift(config, bundle, reference[features], current)
    drifted = found.drifted
    summary |= {
        "status": "drift" if drifted else "stable",
        "verdict": (
            f"drift in {', '.join(drifted)}" if drifted else "no feature crossed a threshold"
        ),
        "drifted": drifted,
        "features": [d.to_json() for d in found.drifts],
        "prediction": found.prediction.to_json(),
    }
    return found


def prediction_drift(
    config: PipelineConfig, bundle: dict[str, Any], reference: pd.DataFrame, current: pd.DataFrame
) -> drift.Drift:
    """The champion's predictions on its training rows against those it served."""
    spec = config.monitoring
    reference_predictions = list(bundle["estimator"].predict(reference))
    if config.model.task == "classification":
        return drift.categorical_drift(
            PREDICTION, reference_predictions, current[PREDICTION], spec.prediction_psi_threshold
        )
    return drift.numeric_drift(
        PREDICTION,
        reference_predictions,
        current[PREDICTION],
        spec.model_copy(update={"psi_threshold": spec.prediction_psi_threshold}),
    )


def drift_event(
    storage: Storage,
    config: PipelineConfig,
    champion: ModelVersion,
    measured: Measured,
    request: events_pb2.MonitoringRequest,
    code_version: str,
    check_id: str,
) -> events_pb2.DriftDetected:
    assert measured.drifts is not None and measured.prediction is not None
    paths = layout.DriftCheckPaths(config.model.name, check_id)
    return events_pb2.DriftDetected(
        context=events.context(
            producer="evaluator",
            code_version=code_version,
            run_id=champion.run_id,
            pipeline=config.name,
            config_sha256=str(champion.info.get("config_sha256", "")),
            request_id=request.request_id,
        ),
        model_name=config.model.name,
        version=champion.version,
        check_id=check_id,
        served_samples=measured.served,
        reference_rows=measured.reference_rows,
        features=[_proto(d) for d in measured.drifts],
        prediction=_proto(measured.prediction),
        report_uri=storage.uri(paths.page),
        checked_at=events.timestamp(dt.datetime.fromisoformat(measured.summary["checked_at"])),
    )


def retrain_if_allowed(
    storage: Storage,
    publisher: Publisher,
    config: PipelineConfig,
    measured: Measured,
    event: events_pb2.DriftDetected,
    now: dt.datetime,
    check_id: str,
) -> None:
    """Publish the retraining IngestRequest when the pipeline allows one now; the event says
    which (retrain_request_id) or why none (retrain_note)."""
    spec = config.monitoring
    retrain = None
    if not spec.retrain.enabled:
        note = "retraining on drift is off (monitoring.retrain.enabled)"
    else:
        retrain, note = retrain_request(storage, config, measured.dataset, measured.fmt, check_id)
        if retrain is not None:
            allowed, why = claim_retrain(storage, config.model.name, spec, now, check_id)
            note = f"{note}; {why}"
            if not allowed:
                retrain = None
    if retrain is not None:
        publisher.publish(retrain, attributes={"request_id": retrain.request_id})
        event.retrain_request_id = retrain.request_id
    event.retrain_note = note
