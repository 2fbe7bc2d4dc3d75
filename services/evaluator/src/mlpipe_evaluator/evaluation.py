"""The evaluator's step: TrainingCompleted → holdout metrics, the champion on the same
holdout, gates → metrics.json → EvaluationCompleted; then, once that is recorded and
published, the report: plots.json (the numbers behind each plot) and report.html.

The gate verdict never waits for the drawing, nor does the push's answer: the delivery marks
the run (reports/pending/<run_id>) and queues its report, drawn on a thread of its own
(ReportQueue). A delivery that finds a recorded run without its report queues it again, and
an instance starting queues every marked run, so a crash anywhere ends with the report
written. Nothing reads the report to decide anything.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import joblib
import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage
from mlpipe.ml.config import PipelineConfig, load_run_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.split import Split
from mlpipe.runtime.steps import Outcome, Recorded, Router, StepResult, permanent, run_step
from mlpipe.store import layout, run_cost
from mlpipe.store.registry import CHAMPION, ModelVersion, Registry
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_evaluator import plots
from mlpipe_evaluator.drawing import DRAWER, Drawer, DrawingFailed
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
    # Where report pages are drawn: a low-priority worker process (mlpipe_evaluator.drawing).
    drawer: Drawer = field(default_factory=lambda: DRAWER)
    # Sizes and prices (MLPIPE_COST_SIZES, MLPIPE_PRICES) of the report's estimate so far.
    cost_sizes: str = ""
    prices: str = ""
    reports: ReportQueue = field(init=False)

    def __post_init__(self) -> None:
        self.reports = ReportQueue(self)

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


@dataclass
class Scored:
    """A model's predictions on a holdout and what they give: metrics and report details."""

    metrics: dict[str, float]
    details: dict[str, Any]
    y_true: list[Any]
    predictions: list[Any]
    proba: Any = None  # per class, in the order of `classes`; None without predict_proba
    classes: list[Any] = field(default_factory=list)


def scored(bundle: dict[str, Any], holdout: pd.DataFrame, config: PipelineConfig) -> Scored:
    """A model bundle scored on a holdout frame."""
    estimator = bundle["estimator"]
    features = bundle["features"]
    y_true = holdout[config.dataset.target].tolist()
    if config.model.task == "regression":
        predictions = list(estimator.predict(holdout[features]))
        return Scored(
            regression_metrics(y_true, predictions),
            regression_details(y_true, predictions),
            y_true,
            predictions,
        )
    predictions, proba = predict_with_proba(estimator, holdout[features])
    classes = list(getattr(estimator, "classes_", ()))
    metrics = classification_metrics(y_true, predictions)
    extra, details = classification_details(y_true, predictions, proba, classes)
    return Scored(metrics | extra, details, y_true, predictions, proba, classes)


def score(
    bundle: dict[str, Any], holdout: pd.DataFrame, config: PipelineConfig
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics (and report details) of a model bundle on a holdout frame."""
    result = scored(bundle, holdout, config)
    return result.metrics, result.details


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


@dataclass
class Champion:
    """The champion scored on a run's holdout (metrics None when it could not be)."""

    metrics: dict[str, float] | None
    version: int
    note: str
    bundle: dict[str, Any] | None = None
    run_id: str = ""  # the run that trained it


def champion_scored(
    storage: Storage,
    model: str,
    run_id: str,
    holdout: pd.DataFrame,
    config: PipelineConfig,
    cache: ChampionCache | None = None,
    version: int | None = None,
) -> Champion:
    """The current champion (or the given version) scored on this run's holdout."""
    registry = Registry(storage)
    if version is None:
        version = registry.alias(model, CHAMPION)
    if version is None:
        return Champion(None, 0, "")
    champion = registry.get(model, version)
    if champion is None:
        return Champion(None, 0, f"champion v{version} is not readable")
    if champion.run_id == run_id:
        return Champion(None, 0, f"this run is already champion v{version}")
    bundle = (cache or ChampionCache()).load(registry, champion)
    missing = [f for f in bundle["features"] if f not in holdout.columns]
    if missing or bundle.get("task", config.model.task) != config.model.task:
        return Champion(
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
        return Champion(None, version, f"champion v{version} failed on this holdout: {exc}")
    return Champion(metrics, version, "", bundle, champion.run_id)


def champion_metrics(
    storage: Storage,
    model: str,
    run_id: str,
    holdout: pd.DataFrame,
    config: PipelineConfig,
    cache: ChampionCache | None = None,
) -> tuple[dict[str, float] | None, int, str]:
    """The current champion scored on this run's holdout: (metrics, version, note)."""
    found = champion_scored(storage, model, run_id, holdout, config, cache)
    return found.metrics, found.version, found.note


@dataclass
class Evaluated:
    """What the scoring left in memory for the report drawn after the verdict."""

    config: PipelineConfig
    bundle: dict[str, Any]
    holdout: pd.DataFrame
    model: Scored
    champion: Champion


def evaluate(trained: events_pb2.TrainingCompleted, deps: Evaluator) -> StepResult:
    """TrainingCompleted → EvaluationCompleted, through the step protocol; then the report."""
    run_id = trained.context.run_id
    if not layout.RUN_ID_PATTERN.match(run_id):
        return permanent(
            PermanentError("invalid_message", f"TrainingCompleted has bad run_id {run_id!r}")
        )
    paths = layout.RunPaths(run_id)
    kept: list[Evaluated] = []
    result = run_step(
        storage=deps.storage,
        publisher=deps.publisher,
        stage="evaluator",
        run_id=run_id,
        skip=Recorded(paths.evaluation, events_pb2.EvaluationCompleted),
        work=lambda: score_run(trained, paths, deps, kept),
        done=lambda result: evaluated(result, run_id),
    )
    if result.outcome is Outcome.DONE:
        if kept or not deps.storage.exists(paths.report):
            # Marked before the push is answered: an instance stopped before drawing it
            # leaves the marker, and the next one to start draws it.
            deps.storage.write(layout.pending_report_path(run_id), b"{}")
            deps.reports.submit(run_id, kept[0] if kept else None, trained)
            result.detail["report"] = "queued"
        else:
            result.detail["report"] = "exists"
    return result


class ReportQueue:
    """Reports drawn after the push is answered, one at a time, on a thread of their own.

    Holding the push while drawing delayed the next message on the subscription (Pub/Sub
    keeps few pushes outstanding per subscription), so the delivery only marks the run
    (layout.pending_report_path) and queues it; the marker goes once the report is written,
    or once it is known it cannot be. `sweep` queues every marked run (on start)."""

    def __init__(self, deps: Evaluator) -> None:
        self.deps = deps
        self._queue: queue.Queue[
            tuple[str, Evaluated | None, events_pb2.TrainingCompleted | None]
        ] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._retries: dict[str, int] = {}

    def submit(
        self,
        run_id: str,
        found: Evaluated | None = None,
        trained: events_pb2.TrainingCompleted | None = None,
    ) -> None:
        """Queue a run's report; without its TrainingCompleted, the one the job recorded."""
        self._queue.put((run_id, found, trained))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="reports", daemon=True)
                self._thread.start()

    def sweep(self) -> list[str]:
        """Queue every run marked as waiting for its report; their ids."""
        runs = layout.pending_report_runs(self.deps.storage.list(layout.PENDING_REPORTS))
        for run_id in runs:
            self.submit(run_id)
        return runs

    def drain(self, timeout: float = 120.0) -> None:
        """Wait until every queued report is done (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)

    def _loop(self) -> None:
        while True:
            try:
                run_id, found, trained = self._queue.get(timeout=30)
            except queue.Empty:
                return
            try:
                self.draw(run_id, found, trained)
            except DrawingFailed as exc:
                # The worker was killed (a stop signal to the service's process group, the
                # memory limit): one more try on a new worker, else the marker stays.
                if self._retries.get(run_id, 0) < 1:
                    self._retries[run_id] = self._retries.get(run_id, 0) + 1
                    log.warning("run %s: %s; drawing it again", run_id, exc)
                    self._queue.put((run_id, found, trained))
                else:
                    self._retries.pop(run_id, None)
                    log.warning("run %s: %s; left for the next start", run_id, exc)
            except Exception:  # the marker stays: the next start draws it
                log.exception("run %s: report not written; left for the next start", run_id)
            else:
                self._retries.pop(run_id, None)
            finally:
                self._queue.task_done()

    def draw(
        self,
        run_id: str,
        found: Evaluated | None,
        trained: events_pb2.TrainingCompleted | None = None,
    ) -> str:
        """Write the run's report unless it exists, then drop its marker; what was done."""
        storage = self.deps.storage
        paths = layout.RunPaths(run_id)
        try:
            if trained is None:
                trained = events.from_json(
                    events_pb2.TrainingCompleted, _require(storage, paths.training).data
                )
            # One thread for scikit-learn's and numpy's pools: the report is drawn while the
            # deployer and the predictor act on the verdict, and must not take their cores.
            with threadpool_limits(limits=1):
                done = write_report(trained, paths, self.deps, found)
        except PermanentError as exc:
            # The verdict stands without its report; say why there is none.
            log.warning("run %s: no report: %s", run_id, exc.message)
            done = f"not written: {exc.message}"
        storage.delete(layout.pending_report_path(run_id))
        log.info("run %s: report %s", run_id, done)
        return done


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
    trained: events_pb2.TrainingCompleted,
    paths: layout.RunPaths,
    deps: Evaluator,
    kept: list[Evaluated] | None = None,
) -> events_pb2.EvaluationCompleted:
    """The pure step: score the model and the champion on the holdout, apply the gates, and
    write metrics.json; the EvaluationCompleted to record. What it scored is appended to
    `kept`, for the report."""
    run_id = trained.context.run_id
    config, bundle, holdout = holdout_of(trained, deps)
    model = scored(bundle, holdout, config)
    metrics = model.metrics
    found = champion_scored(
        deps.storage, trained.model_name, run_id, holdout, config, deps.champions
    )
    champion, champion_version, note = found.metrics, found.version, found.note
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
            "details": model.details,
        },
    )
    if kept is not None:
        kept.append(Evaluated(config, bundle, holdout, model, found))
    # The recorded event is written next (run_step), last: a run is "evaluated" once it
    # exists; the report follows it.
    return result


def recorded_importance(storage: Storage, run_id: str) -> dict[str, Any] | None:
    """A run's own permutation importances, from its plots.json (None if it has none)."""
    recorded = storage.read_json(layout.RunPaths(run_id).plots) or {}
    for entry in recorded.get("plots", []):
        if entry.get("kind") == "permutation_importance":
            return {k: v for k, v in entry.items() if k not in {"kind", "champion"}}
    return None


def importance_plot(storage: Storage, run_id: str, found: Evaluated) -> dict[str, Any]:
    """This run's permutation importances beside the champion's: those its own run recorded
    (on its holdout) where there are some, else measured on this holdout."""
    config, holdout = found.config, found.holdout
    target = holdout[config.dataset.target]
    features = found.bundle["features"]
    ours = plots.importance(found.bundle["estimator"], holdout[features], target, config.model.task)
    ours["holdout_of_run"] = run_id
    champion = found.champion
    theirs = recorded_importance(storage, champion.run_id) if champion.run_id else None
    if theirs is None and champion.bundle is not None:
        try:
            theirs = plots.importance(
                champion.bundle["estimator"],
                holdout[champion.bundle["features"]],
                target,
                config.model.task,
            )
            theirs["holdout_of_run"] = run_id
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("champion v%d: no permutation importance: %s", champion.version, exc)
    return plots.permutation_importance_plot(ours, theirs, champion.version)


def plot_data(storage: Storage, run_id: str, found: Evaluated) -> dict[str, Any]:
    """plots.json: every plot of the run's report, in the order the report shows them; a plot
    whose numbers could not be computed is an entry with its kind and the `error`."""
    config, model, holdout = found.config, found.model, found.holdout
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if config.model.task == "classification":
        labels, matrix = model.details["labels"], model.details["confusion_matrix"]
        steps.append(("confusion_matrix", lambda: plots.confusion_matrix(labels, matrix)))
        if model.proba is not None:
            args = (model.y_true, model.proba, model.classes)
            steps += [
                ("roc", lambda: plots.roc_curves(*args)),
                ("precision_recall", lambda: plots.precision_recall_curves(*args)),
                ("calibration", lambda: plots.calibration(*args)),
            ]
    else:
        truth, predicted = model.y_true, model.predictions
        steps += [
            ("predicted_vs_actual", lambda: plots.predicted_vs_actual(truth, predicted)),
            ("residuals", lambda: plots.residuals(truth, predicted)),
        ]
        steps += [
            (
                "error_by_segment",
                partial(plots.error_by_segment, column, holdout[column], truth, predicted),
            )
            for column, kind in config.dataset.columns.items()
            if kind == "categorical" and column in holdout.columns
        ]
    steps.append(("permutation_importance", lambda: importance_plot(storage, run_id, found)))
    entries = []
    for kind, compute in steps:
        try:
            entries.append(compute())
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # One plot's numbers failing must not cost the report (or loop the delivery).
            log.warning("run %s: no %s plot: %s", run_id, kind, exc)
            entries.append({"kind": kind, "error": str(exc)})
    return {
        "version": plots.PLOTS_VERSION,
        "run_id": run_id,
        "task": config.model.task,
        "holdout_rows": len(holdout),
        "plots": entries,
    }


def write_report(
    trained: events_pb2.TrainingCompleted,
    paths: layout.RunPaths,
    deps: Evaluator,
    found: Evaluated | None,
) -> str:
    """plots.json then report.html, unless the report exists; what was done, in one word.

    Without what the scoring kept (a redelivery of a recorded run), the plots come from the
    recorded plots.json, or are computed again from the recorded event: the holdout, and the
    champion version it names (not whichever is champion now)."""
    if deps.storage.exists(paths.report):
        return "exists"
    recorded = events.from_json(
        events_pb2.EvaluationCompleted, _require(deps.storage, paths.evaluation).data
    )
    data = deps.storage.read_json(paths.plots)
    if data is None:
        if found is None:
            config, bundle, holdout = holdout_of(trained, deps)
            champion = (
                champion_scored(
                    deps.storage,
                    trained.model_name,
                    trained.context.run_id,
                    holdout,
                    config,
                    deps.champions,
                    version=recorded.champion_version,
                )
                if recorded.champion_version
                else Champion(None, 0, "")
            )
            found = Evaluated(config, bundle, holdout, scored(bundle, holdout, config), champion)
        data = plot_data(deps.storage, trained.context.run_id, found)
        deps.storage.write_json(paths.plots, data)
    if found is not None:
        details = found.model.details
    else:
        details = (deps.storage.read_json(paths.metrics) or {}).get("details", {})
    page = deps.drawer.page(
        recorded, details, deps.storage.read_json(paths.lineage), data, cost_so_far(paths, deps)
    )
    deps.storage.write(paths.report, page.encode(), content_type="text/html; charset=utf-8")
    return "written"


def cost_so_far(paths: layout.RunPaths, deps: Evaluator) -> dict[str, Any]:
    """The report's estimate: every step up to this evaluation (the deployer's is the run's
    recorded one, cost.json), as JSON; without sizes or prices, why there is none. A report
    is never lost to its estimate."""
    try:
        cost = run_cost.estimate_in_bucket(
            deps.storage, paths.run_id, deps.cost_sizes, deps.prices, steps_of=SO_FAR
        )
    except run_cost.CostInputError as exc:
        return {"no_estimate": str(exc)}
    except Exception as exc:  # the report is drawn either way
        log.warning("run %s: no cost estimate in the report: %r", paths.run_id, exc)
        return {"no_estimate": f"the estimate failed: {exc!r}"}
    return {"estimate": run_cost.cost_to_dict(cost)}


# The steps a report estimates: all but the deployer's, which comes after it.
SO_FAR = tuple(step for step in run_cost.STEPS if step != "deployer")


def _require(storage: Storage, path: str) -> Any:
    found = storage.read(path)
    if found is None:
        raise PermanentError("artifact_missing", f"{path} does not exist")
    return found


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
