"""The evaluator's step: TrainingCompleted → holdout metrics → gates → EvaluationCompleted."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import joblib

from mlpipe import events, lineage
from mlpipe.config import load_run_config
from mlpipe.data import Split, read_dataset
from mlpipe.errors import PermanentError
from mlpipe.publishing import Publisher
from mlpipe.push import PushMessage
from mlpipe.service import StepResult
from mlpipe.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_evaluator.metrics import apply_gates, classification_metrics, regression_metrics

log = logging.getLogger(__name__)


@dataclass
class Evaluator:
    storage: Storage
    publisher: Publisher
    code_version: str

    def __call__(self, message: PushMessage) -> StepResult:
        return evaluate(message, self)


def _read_verified(storage: Storage, uri: str, sha256: str, what: str) -> bytes:
    obj = storage.read(storage.path_of(uri))
    if obj is None:
        raise PermanentError("artifact_missing", f"{what} {uri} does not exist")
    if sha256 and sha256_hex(obj.data) != sha256:
        raise PermanentError("sha256_mismatch", f"{what} {uri} does not match its sha256")
    return obj.data


def evaluate(message: PushMessage, deps: Evaluator) -> StepResult:
    try:
        trained = events.decode(
            events_pb2.TrainingCompleted,
            message.data,
            message.attributes.get(events.SCHEMA_ENCODING_ATTR, ""),
        )
    except events.EventDecodeError as exc:
        raise PermanentError("invalid_message", str(exc)) from exc
    run_id = trained.context.run_id
    if not lineage.RUN_ID_PATTERN.match(run_id):
        raise PermanentError("invalid_message", f"TrainingCompleted has bad run_id {run_id!r}")
    paths = lineage.RunPaths(run_id)

    recorded = deps.storage.read(paths.evaluation)
    if recorded is not None:
        deps.publisher.publish(events.from_json(events_pb2.EvaluationCompleted, recorded.data))
        return StepResult(
            "duplicate", {"detail": "already evaluated; event re-published"}, run_id=run_id
        )

    config = load_run_config(deps.storage, run_id)
    model_bytes = _read_verified(deps.storage, trained.model_uri, trained.model_sha256, "model")
    # Verified against the sha256 the training job recorded before unpickling.
    bundle = joblib.load(io.BytesIO(model_bytes))
    split_obj = deps.storage.read(deps.storage.path_of(trained.split_uri))
    if split_obj is None:
        raise PermanentError("artifact_missing", f"split {trained.split_uri} does not exist")
    split = Split.from_json(split_obj.json())
    data = _read_verified(deps.storage, trained.dataset.uri, trained.dataset.sha256, "dataset")
    frame = read_dataset(data, trained.dataset.format or "csv", trained.dataset.uri)
    holdout = frame.iloc[split.holdout]
    predictions = bundle["estimator"].predict(holdout[bundle["features"]])
    y_true = holdout[config.dataset.target].tolist()
    if config.model.task == "classification":
        metrics = classification_metrics(y_true, list(predictions))
    else:
        metrics = regression_metrics(y_true, list(predictions))
    gates = apply_gates(config.gates, metrics)
    passed = all(g.passed for g in gates)

    deps.storage.write_json(
        paths.metrics,
        {
            "run_id": run_id,
            "task": config.model.task,
            "holdout_rows": len(holdout),
            "metrics": metrics,
            "passed": passed,
            "gates": [events.to_dict(g) for g in gates],
        },
    )
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
    )
    if deps.storage.create_if_absent(paths.evaluation, events.to_json(result).encode()) is None:
        # A concurrent delivery recorded its result first: publish that one, not ours.
        recorded = deps.storage.read(paths.evaluation)
        if recorded is not None:
            result = events.from_json(events_pb2.EvaluationCompleted, recorded.data)
    deps.publisher.publish(result)
    failed = [
        f"{g.name}={g.value:.4f} (needs {g.comparison} {g.threshold})"
        for g in gates
        if not g.passed
    ]
    log.info(
        "evaluated: %s%s",
        "passed" if passed else "FAILED",
        f" ({'; '.join(failed)})" if failed else "",
        extra={"metrics": metrics},
    )
    return StepResult("passed" if passed else "gates_failed", {"metrics": metrics}, run_id=run_id)
