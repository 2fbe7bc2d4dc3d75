"""Promotions of a registered model version from one environment's bucket to another's
(docs/promotion.md): the order rule, what is checked of the source before anything moves, the
verified copy, and the record of each promotion in the target,
`promotions/<model>/<version>-from-<env>.json` (mlpipe.store.layout.promotion_path).

The order of environments is the caller's (the operator side owns it: mlpipe_ops.release
PROMOTION, the same order code releases go through), so nothing here names an environment.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc
from google.protobuf import json_format
from google.protobuf.message import Message

from mlpipe.store import layout
from mlpipe.store.registry import MODEL_FILE, ModelVersion, Registry
from mlpipe.store.storage import BadObjectUri, Storage, sha256_hex
from mlpipe.v1 import events_pb2

# A promotion record's states: the copy has started (a repeated promotion resumes it), or the
# TrainingCompleted that starts the target's evaluation is recorded and published.
COPYING = "copying"
PUBLISHED = "published"


class Refusal(ValueError):
    """A promotion that must not happen; nothing was written. `reason` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class CopyMismatch(RuntimeError):
    """An object read back after writing it into the target is not the bytes sent."""


# --- the order of environments ----------------------------------------------------------------
def previous_env(order: Sequence[str], to_env: str) -> str:
    """The environment before `to_env` in `order`: where a promotion comes from by default."""
    if to_env not in order:
        raise Refusal("unknown_env", f"{to_env!r} is not in the promotion order ({_path(order)})")
    index = order.index(to_env)
    if index == 0:
        raise Refusal(
            "first_env",
            f"{to_env} is the first environment ({_path(order)}): nothing is promoted into it",
        )
    return order[index - 1]


def check_direction(order: Sequence[str], from_env: str, to_env: str) -> None:
    """A promotion goes forward along `order`: never to the same environment, never back."""
    for env in (from_env, to_env):
        if env not in order:
            raise Refusal("unknown_env", f"{env!r} is not in the promotion order ({_path(order)})")
    if from_env == to_env:
        raise Refusal(
            "same_env", f"{from_env} → {to_env}: a version is not promoted into its own environment"
        )
    if order.index(from_env) > order.index(to_env):
        raise Refusal(
            "against_order",
            f"{from_env} → {to_env} goes against the promotion order ({_path(order)})",
        )


def _path(order: Sequence[str]) -> str:
    return " → ".join(order)


# --- the source version, checked ---------------------------------------------------------------
@dataclass(frozen=True)
class SourceVersion:
    """A registered version and every record of the run that made it, each verified: what a
    promotion copies."""

    env: str
    project: str
    storage: Storage
    version: ModelVersion
    model_bytes: bytes
    extras: dict[str, bytes]  # extra artifacts by file name (model.onnx), verified
    trained: events_pb2.TrainingCompleted
    evaluation: events_pb2.EvaluationCompleted
    metrics: dict[str, Any]
    config: bytes  # runs/<run_id>/config.json
    split: bytes
    lineage: bytes
    dataset: bytes
    # The run's recorded events and metrics as stored: training.json, evaluation.json, metrics.json
    records: dict[str, bytes] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.version.model

    @property
    def run_id(self) -> str:
        return self.version.run_id

    def artifacts(self) -> dict[str, dict[str, str]]:
        """Every artifact of the version: file name → {uri, sha256} in the source."""
        found = {MODEL_FILE: {"uri": self.version.model_uri, "sha256": self.version.model_sha256}}
        for name in self.extras:
            extra = self.version.artifact(name)
            if extra is not None:
                found[name] = {"uri": extra[0], "sha256": extra[1]}
        return found

    def describe(self) -> dict[str, Any]:
        """What an approval request and a promotion record say of the source."""
        return {
            "env": self.env,
            "project": self.project,
            "bucket": self.storage.bucket_name,
            "model": self.model,
            "version": self.version.version,
            "run_id": self.run_id,
            "pipeline": self.trained.context.pipeline,
            "model_uri": self.version.model_uri,
            "model_sha256": self.version.model_sha256,
            "artifacts": self.artifacts(),
            "lineage_uri": self.trained.lineage_uri,
            "dataset": {"uri": self.trained.dataset.uri, "sha256": self.trained.dataset.sha256},
            "metrics": dict(self.evaluation.metrics),
        }


def _event(storage: Storage, path: str, cls: type[Message], what: str) -> tuple[Any, bytes]:
    found = storage.read(path)
    if found is None:
        raise Refusal("run_records_missing", f"{what} {storage.uri(path)} does not exist")
    message = cls()
    try:
        json_format.Parse(found.data, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise Refusal("run_records_unreadable", f"{what} {found.uri}: {exc}") from None
    return message, found.data


def _object(storage: Storage, uri: str, what: str, sha256: str = "", generation: int = 0) -> bytes:
    try:
        path = storage.path_of(uri)
    except BadObjectUri as exc:
        raise Refusal("run_records_missing", f"{what}: {exc.message}") from None
    found = storage.read(path, generation=generation or None)
    if found is None:
        raise Refusal("run_records_missing", f"{what} {uri} does not exist")
    actual = sha256_hex(found.data)
    if sha256 and actual != sha256:
        raise Refusal(
            "sha256_mismatch", f"{what} {uri} has sha256 {actual}, its record says {sha256}"
        )
    return found.data


def _failed_gates(evaluation: events_pb2.EvaluationCompleted) -> str:
    failed = []
    for gate in evaluation.gates:
        if gate.passed:
            continue
        if gate.gate_comparison == events_pb2.GATE_COMPARISON_AT_MOST:
            needs = "<="
        elif gate.gate_comparison == events_pb2.GATE_COMPARISON_AT_LEAST:
            needs = ">="
        else:
            needs = gate.comparison
        failed.append(f"{gate.name}={gate.value:.4f} (needs {needs} {gate.threshold:.4g})")
    return "; ".join(failed) or "no gate named"


def verify_source(
    storage: Storage, env: str, project: str, model: str, version: int
) -> SourceVersion:
    """The version, checked: it is complete in `env`'s registry, its artifacts' bytes match the
    sha256 its record holds (the model and every extra, e.g. model.onnx), its run recorded an
    evaluation that passed (evaluation.json and metrics.json, as the evaluator wrote them) of
    this very model, and the run's config, split, lineage and dataset bytes are there (the
    dataset matching its sha256). Raise Refusal naming the first problem."""
    registry = Registry(storage)
    mv = registry.get(model, version)
    if mv is None:
        known = ", ".join(f"v{v}" for v in registry.versions(model)) or "none"
        raise Refusal(
            "version_missing",
            f"{model} v{version} is not a complete version in {env}'s registry "
            f"(gs://{storage.bucket_name}/{layout.RegistryPaths(model).versions}; versions: "
            f"{known})",
        )
    where = f"{model} v{version} in {env}"
    try:
        model_bytes = registry.load_artifact(mv)
        extras = {
            name: registry.load_artifact(mv, name)
            for name in sorted(mv.info.get("artifacts") or {})
        }
    except FileNotFoundError as exc:
        raise Refusal("artifact_missing", f"{where}: {exc}") from None
    except ValueError as exc:
        raise Refusal("sha256_mismatch", f"{where}: {exc}") from None
    paths = layout.RunPaths(mv.run_id)
    trained, trained_data = _event(
        storage,
        paths.training,
        events_pb2.TrainingCompleted,
        f"{where}: the run's TrainingCompleted",
    )
    evaluation, evaluation_data = _event(
        storage, paths.evaluation, events_pb2.EvaluationCompleted, f"{where}: the run's evaluation"
    )
    if not evaluation.passed:
        raise Refusal(
            "gates_failed",
            f"{where} did not pass its gates there (run {mv.run_id}: {_failed_gates(evaluation)})",
        )
    metrics_obj = storage.read(paths.metrics)
    if metrics_obj is None:
        raise Refusal(
            "run_records_missing", f"{where}: {storage.uri(paths.metrics)} does not exist"
        )
    metrics = metrics_obj.json()
    if metrics.get("passed") is not True:
        raise Refusal(
            "gates_failed",
            f"{where} did not pass its gates there ({metrics_obj.uri} says passed="
            f"{metrics.get('passed')})",
        )
    for what, sha in (("evaluated", evaluation.model_sha256), ("trained", trained.model_sha256)):
        if sha != mv.model_sha256:
            raise Refusal(
                "sha256_mismatch",
                f"{where}: the model its run {what} has sha256 {sha}, the registry's "
                f"{mv.model_sha256}",
            )
    config = _object(storage, storage.uri(paths.config), f"{where}: the run's config")
    split = _object(storage, trained.split_uri, f"{where}: the run's split")
    lineage = _object(storage, trained.lineage_uri, f"{where}: the run's lineage")
    dataset = _object(
        storage,
        trained.dataset.uri,
        f"{where}: the run's dataset",
        trained.dataset.sha256,
        trained.dataset.generation,
    )
    return SourceVersion(
        env=env,
        project=project,
        storage=storage,
        version=mv,
        model_bytes=model_bytes,
        extras=extras,
        trained=trained,
        evaluation=evaluation,
        metrics=metrics,
        config=config,
        split=split,
        lineage=lineage,
        dataset=dataset,
        records={
            "training.json": trained_data,
            "evaluation.json": evaluation_data,
            "metrics.json": metrics_obj.data,
        },
    )


def same_source(source: SourceVersion, recorded: Mapping[str, Any]) -> str:
    """'' when `recorded` (an approval's or a promotion's "source") names this version with
    the same bytes; else what differs."""
    if (recorded.get("env"), recorded.get("model"), recorded.get("version")) != (
        source.env,
        source.model,
        source.version.version,
    ):
        return (
            f"it names {recorded.get('model')} v{recorded.get('version')} from "
            f"{recorded.get('env')}, not {source.model} v{source.version.version} from {source.env}"
        )
    artifacts = recorded.get("artifacts") or {}
    now = source.artifacts()
    for name in sorted(set(artifacts) | set(now)):
        was = (artifacts.get(name) or {}).get("sha256")
        is_now = (now.get(name) or {}).get("sha256")
        if was != is_now:
            return f"{name} had sha256 {was} when it was asked for, {is_now} now"
    return ""


# --- copies ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Copy:
    source_uri: str  # "" for an object written from what the promotion derived
    uri: str
    sha256: str
    generation: int

    def to_json(self) -> dict[str, Any]:
        found = {"to": self.uri, "sha256": self.sha256}
        return {"from": self.source_uri, **found} if self.source_uri else found


def copy_verified(
    target: Storage, path: str, data: bytes, source_uri: str = "", content_type: str = ""
) -> Copy:
    """Write `data` at `path` in the target, read it back and compare its sha256 with the
    bytes sent (a copy of `source_uri`, or an object the promotion wrote); CopyMismatch when
    they differ."""
    expected = sha256_hex(data)
    target.write(path, data, content_type=content_type or _content_type(path))
    found = target.read(path)
    actual = None if found is None else sha256_hex(found.data)
    if found is None or actual != expected:
        raise CopyMismatch(
            f"{target.uri(path)}: read back with sha256 {actual}, written with {expected}"
        )
    return Copy(source_uri, target.uri(path), expected, found.generation)


def _content_type(path: str) -> str:
    if path.endswith(".json"):
        return "application/json"
    if path.endswith(".csv"):
        return "text/csv"
    return "application/octet-stream"


# --- the record of a promotion ------------------------------------------------------------------
@dataclass(frozen=True)
class PromotionRecord:
    record: dict[str, Any]
    generation: int

    @property
    def state(self) -> str:
        return str(self.record.get("state", ""))

    @property
    def run_id(self) -> str:
        return str(self.record.get("run_id", ""))


def read_promotion(
    target: Storage, model: str, version: int, from_env: str
) -> PromotionRecord | None:
    found = target.read(layout.promotion_path(model, version, from_env))
    return None if found is None else PromotionRecord(found.json(), found.generation)


def start_promotion(
    target: Storage, model: str, version: int, from_env: str, record: Mapping[str, Any]
) -> tuple[PromotionRecord, bool]:
    """Create the promotion's record (state copying) unless one exists; (the record, created)."""
    path = layout.promotion_path(model, version, from_env)
    data = json.dumps({**record, "state": COPYING}, indent=2, sort_keys=True, default=str).encode()
    generation = target.create_if_absent(path, data)
    if generation is not None:
        return PromotionRecord(json.loads(data), generation), True
    existing = read_promotion(target, model, version, from_env)
    if existing is None:  # deleted between the two requests: start again
        return start_promotion(target, model, version, from_env, record)
    return existing, False


def finish_promotion(
    target: Storage,
    started: PromotionRecord,
    model: str,
    version: int,
    from_env: str,
    record: Mapping[str, Any],
) -> PromotionRecord:
    """Mark the promotion published (conditioned on the record as started); a concurrent
    attempt that finished first leaves its own record, which is returned."""
    path = layout.promotion_path(model, version, from_env)
    final = {
        **started.record,
        **record,
        "state": PUBLISHED,
        "published_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    try:
        generation = target.write_json(path, final, if_generation_match=started.generation)
    except gexc.PreconditionFailed:
        current = read_promotion(target, model, version, from_env)
        if current is None:
            raise
        return current
    return PromotionRecord(final, generation)
