"""The evaluator's step: TrainingCompleted → holdout metrics, the champion on the same
holdout, gates → metrics.json + report.html → EvaluationCompleted."""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import joblib
import numpy as np
import pandas as pd

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage
from mlpipe.ml.config import PipelineConfig, load_run_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.split import Split
from mlpipe.runtime.steps import Recorded, Router, StepResult, permanent, run_step
from mlpipe.store import layout
from mlpipe.store.registry import CHAMPION, ModelVersion, Registry
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_evaluator import report
from mlpipe_evaluator.metrics import (
    apply_gates,
    classification_details,
    classification_metrics,
    regression_details,
    regression_metrics,
    relative_gates,
)

log = logging.getLogger(__name__)

TRAINING_COMPLETED = events_pb2.TrainingCompleted.DESCRIPTOR.full_name
MONITORING_REQUEST = events_pb2.MonitoringRequest.DESCRIPTOR.full_name


@dataclass
class Evaluator:
    storage: Storage
    publisher: Publisher
    code_version: str
    # Champions loaded by earlier runs, by their registered sha256 (a version never changes).
    champions: ChampionCache = field(default_factory=lambda: ChampionCache())

    def __call__(self, message: PushMessage) -> StepResult:
        return Router(
            {
                TRAINING_COMPLETED: lambda event, _: evaluate(event, self),
                MONITORING_REQUEST: lambda event, _: self.monitor(event),
            },
            default=TRAINING_COMPLETED,
        )(message)

    def monitor(self, request: events_pb2.MonitoringRequest) -> StepResult:
        from mlpipe_evaluator import monitor

        try:
            result = monitor.check(
                self.storage, self.publisher, self.code_version, request, self.champions.load
            )
        except PermanentError as exc:
            return permanent(exc)
        return StepResult(
            result.status,
            {
                "check_id": result.report.get("check_id"),
                "verdict": result.report.get("verdict"),
                "retrain_request_id": result.report.get("retrain_request_id", ""),
            },
            run_id=str(result.report.get("run_id", "")),
        )


def _read_verified(storage: Storage, uri: str, sha256: str, what: str) -> bytes:
    obj = storage.read(storage.path_of(uri))
    if obj is None:
        raise PermanentError("artifact_missing", f"{what} {uri} does not exist")
    if sha256 and sha256_hex(obj.data) != sha256:
        raise PermanentError("sha256_mismatch", f"{what} {uri} does not match its sha256")
    return obj.data


# Classifiers whose predict() is, in scikit-learn's own code, classes_[argmax(predict_proba)]:
# one pass over the trees gives both. Any other estimator is asked for both.
LABELS_FROM_PROBA = frozenset(
    {
        "RandomForestClassifier",
        "ExtraTreesClassifier",
        "DecisionTreeClassifier",
        "ExtraTreeClassifier",
        "HistGradientBoostingClassifier",
    }
)


def _final_step(estimator: Any) -> Any:
    steps = getattr(estimator, "steps", None)
    return steps[-1][1] if steps else estimator


def predict_with_proba(estimator: Any, frame: pd.DataFrame) -> tuple[list[Any], Any]:
    """(labels, probabilities or None) of a classifier, in one pass where that is exact."""
    if not hasattr(estimator, "predict_proba"):
        return list(estimator.predict(frame)), None
    proba = estimator.predict_proba(frame)
    if type(_final_step(estimator)).__name__ in LABELS_FROM_PROBA:
        return list(estimator.classes_.take(np.argmax(proba, axis=1))), proba
    return list(estimator.predict(frame)), proba


def score(
    bundle: dict[str, Any], holdout: pd.DataFrame, config: PipelineConfig
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics (and report details) of a model bundle on a holdout frame."""
    estimator = bundle["estimator"]
    features = bundle["features"]
    y_true = holdout[config.dataset.target].tolist()
    if config.model.task == "regression":
        predictions = list(estimator.predict(holdout[features]))
        return regression_metrics(y_true, predictions), regression_details(y_true, predictions)
    predictions, proba = predict_with_proba(estimator, holdout[features])
    metrics = classification_metrics(y_true, predictions)
    extra, details = classification_details(
        y_true, predictions, proba, getattr(estimator, "classes_", ())
    )
    return metrics | extra, details


class ChampionCache:
    """The last few champions' unpickled bundles, keyed by their verified sha256."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._bundles: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, registry: Registry, champion: ModelVersion) -> dict[str, Any]:
        with self._lock:
            bundle = self._bundles.get(champion.model_sha256)
        if bundle is None:
            bundle = joblib.load(io.BytesIO(registry.load_artifact(champion)))  # sha256 verified
            with self._lock:
                self._bundles[champion.model_sha256] = bundle
                while len(self._bundles) > self.size:
                    self._bundles.popitem(last=False)
        return bundle


def champion_metrics(
    storage: Storage,
    model: str,
    run_id: str,
    holdout: pd.DataFrame,
    config: PipelineConfig,
    cache: ChampionCache | None = None,
) -> tuple[dict[str, float] | None, int, str]:
    """The current champion scored on this run's holdout: (metrics, version, note)."""
    registry = Registry(storage)
    version = registry.alias(model, CHAMPION)
    if version is None:
        return None, 0, ""
    champion = registry.get(model, version)
    if champion is None:
        return None, 0, f"champion v{version} is not readable"
    if champion.run_id == run_id:
        return None, 0, f"this run is already champion v{version}"
    bundle = (cache or ChampionCache()).load(registry, champion)
    missing = [f for f in bundle["features"] if f not in holdout.columns]
    if missing or bundle.get("task", config.model.task) != config.model.task:
        return (
            None,
            version,
            (
                f"champion v{version} cannot score this holdout "
                f"(needs {missing or bundle.get('task')})"
            ),
        )
    try:
        metrics, _ = score(bundle, holdout, config)
    except (ValueError, TypeError, KeyError) as exc:
        return None, version, f"champion v{version} failed on this holdout: {exc}"
    return metrics, version, ""


def evaluate(trained: events_pb2.TrainingCompleted, deps: Evaluator) -> StepResult:
    """TrainingCompleted → EvaluationCompleted, through the step protocol."""
    run_id = trained.context.run_id
    if not layout.RUN_ID_PATTERN.match(run_id):
        return permanent(
            PermanentError("invalid_message", f"TrainingCompleted has bad run_id {run_id!r}")
        )
    paths = layout.RunPaths(run_id)
    return run_step(
        storage=deps.storage,
        publisher=deps.publisher,
        stage="evaluator",
        run_id=run_id,
        skip=Recorded(paths.evaluation, events_pb2.EvaluationCompleted),
        work=lambda: score_run(trained, paths, deps),
        done=lambda result: evaluated(result, run_id),
    )


def holdout_of(
    trained: events_pb2.TrainingCompleted, deps: Evaluator
) -> tuple[PipelineConfig, dict[str, Any], pd.DataFrame]:
    """The run's config, its model (verified, then unpickled) and its holdout rows."""
    config = load_run_config(deps.storage, trained.context.run_id)
    model_bytes = _read_verified(deps.storage, trained.model_uri, trained.model_sha256, "model")
    # Verified against the sha256 the training job recorded before unpickling.
    bundle = joblib.load(io.BytesIO(model_bytes))
    split_obj = deps.storage.read(deps.storage.path_of(trained.split_uri))
    if split_obj is None:
        raise PermanentError("artifact_missing", f"split {trained.split_uri} does not exist")
    split = Split.from_json(split_obj.json())
    data = _read_verified(deps.storage, trained.dataset.uri, trained.dataset.sha256, "dataset")
    frame = read_dataset(data, events.data_format(trained.dataset) or "csv", trained.dataset.uri)
    return config, bundle, frame.iloc[split.holdout]


def score_run(
    trained: events_pb2.TrainingCompleted, paths: layout.RunPaths, deps: Evaluator
) -> events_pb2.EvaluationCompleted:
    """The pure step: score the model and the champion on the holdout, apply the gates, and
    write metrics.json and report.html; the EvaluationCompleted to record."""
    run_id = trained.context.run_id
    config, bundle, holdout = holdout_of(trained, deps)
    metrics, details = score(bundle, holdout, config)
    champion, champion_version, note = champion_metrics(
        deps.storage, trained.model_name, run_id, holdout, config, deps.champions
    )
    gates = apply_gates(config.gates, metrics) + relative_gates(
        config.gates, metrics, champion, note
    )
    passed = all(g.passed for g in gates)
    result = events_pb2.EvaluationCompleted(
        context=events.next_context(
            trained.context, producer="evaluator", code_version=deps.code_version
        ),
        dataset=trained.dataset,
        model_uri=trained.model_uri,
        model_sha256=trained.model_sha256,
        model_name=trained.model_name,
        passed=passed,
        metrics=metrics,
        gates=gates,
        metrics_uri=deps.storage.uri(paths.metrics),
        holdout_rows=len(holdout),
        champion_metrics=champion or {},
        champion_version=champion_version if champion else 0,
        report_uri=deps.storage.uri(paths.report),
    )
    deps.storage.write_json(
        paths.metrics,
        {
            "run_id": run_id,
            "task": config.model.task,
            "holdout_rows": len(holdout),
            "metrics": metrics,
            "passed": passed,
            "champion": {"version": champion_version, "metrics": champion, "note": note},
            "gates": [events.to_dict(g) for g in gates],
            "details": details,
        },
    )
    page = report.render(result, details, deps.storage.read_json(paths.lineage))
    deps.storage.write(paths.report, page.encode(), content_type="text/html; charset=utf-8")
    # The recorded event is written next (run_step), last: a run is "evaluated" only once
    # all of it exists.
    return result


def evaluated(result: events_pb2.EvaluationCompleted, run_id: str) -> StepResult:
    failed = [
        f"{g.name}={g.value:.4f} (needs {events.gate_comparison(g)} {g.threshold:.4g})"
        for g in result.gates
        if not g.passed
    ]
    log.info(
        "evaluated: %s%s",
        "passed" if result.passed else "FAILED",
        f" ({'; '.join(failed)})" if failed else "",
        extra={"metrics": dict(result.metrics)},
    )
    return StepResult(
        "passed" if result.passed else "gates_failed",
        {"metrics": dict(result.metrics)},
        run_id=run_id,
    )
