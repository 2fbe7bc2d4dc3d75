"""The deployer's step: EvaluationCompleted → (on pass) compile and check an ONNX model,
register a version, roll it out (promote it, or start a canary), make the target match.

TrainingCompleted → start that compilation at once, in the background, while the evaluator
scores the model: the evaluation then finds it done (or waits for it) instead of paying for it
on the way to serving. Only an optimisation: an evaluation whose compilation was not started in
this process (another instance, a restart) compiles itself.

Registration is idempotent on run_id (see mlpipe.store.registry); the recorded DeploymentCompleted
makes a redelivery re-publish the same outcome instead of deploying again. A target that
fails transiently answers 5xx; the retry finds the version registered and the aliases moved,
and only applies the target again. A target whose operations outlast the request (Vertex AI)
leaves a rollout record: the delivery is acknowledged, and the DeploymentCompleted is recorded
and published when a later check finds the rollout finished (mlpipe_deployer.progress); a
redelivery meanwhile only advances that rollout.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import joblib
import pandas as pd

from mlpipe.errors import PermanentError
from mlpipe.faults import fault_point
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage
from mlpipe.messaging.rollout import traffic_shares
from mlpipe.ml.data import read_dataset
from mlpipe.ml.model_inputs import schema_from_bundle
from mlpipe.ml.split import Split
from mlpipe.runtime.steps import Recorded, Router, StepResult, permanent, run_step
from mlpipe.store import layout
from mlpipe.store.registry import CANARY, CHAMPION, ONNX_FILE, ModelVersion, Registry
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_deployer import progress
from mlpipe_deployer.onnx_compile import ONNX, SKLEARN, Compiled, compile_model
from mlpipe_deployer.targets import DeployTarget, LocalTarget

log = logging.getLogger(__name__)


# The deployer's subscription to TrainingCompleted (see mlpipe.messaging.topology).
TRAINED_PUSH = "deployer-trained-push"
TRAINING_COMPLETED = events_pb2.TrainingCompleted.DESCRIPTOR.full_name
EVALUATION_COMPLETED = events_pb2.EvaluationCompleted.DESCRIPTOR.full_name
CompileResult = tuple[Compiled, dict[str, Any]]


class Precompiled:
    """ONNX compilations started on TrainingCompleted, keyed by (run_id, model sha256).

    One worker thread: compilations run one at a time, beside the request threads. The newest
    `limit` are kept; one that no evaluation claims (its gates failed) is simply dropped.
    """

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="precompile")
        self._futures: OrderedDict[tuple[str, str], Future[CompileResult]] = OrderedDict()
        self._lock = threading.Lock()
        self._warm: Future[None] | None = None

    def start(self, key: tuple[str, str], compile_fn: Any) -> bool:
        """Schedule `compile_fn()` under `key`; False when it is already there."""
        with self._lock:
            if key in self._futures:
                return False
            self._futures[key] = self._pool.submit(compile_fn)
            while len(self._futures) > self.limit:
                self._futures.popitem(last=False)
            return True

    def warm_up(self, warm: Callable[[], Compiled]) -> Future[None]:
        """Run `warm()` (a first, tiny compilation) on the compilations' thread."""

        def run() -> None:
            try:
                log.info("ONNX compiler warmed up: %s", warm().note)
            except Exception:
                log.warning("the ONNX warm-up failed; the first compilation pays", exc_info=True)

        self._warm = self._pool.submit(run)
        return self._warm

    def warmed(self, timeout: float = 120.0) -> None:
        """Wait for the warm-up, if one was started, so two first conversions never overlap."""
        if self._warm is not None:
            with contextlib.suppress(Exception):
                self._warm.result(timeout=timeout)

    def take(self, key: tuple[str, str], timeout: float = 120.0) -> CompileResult | None:
        """The compilation started for `key` (waiting for it to finish), or None."""
        with self._lock:
            future = self._futures.pop(key, None)
        if future is None:
            return None
        try:
            return future.result(timeout=timeout)
        except Exception:
            log.warning(
                "the early compilation of %s failed; compiling again", key[0], exc_info=True
            )
            return None


@dataclass
class Deployer:
    storage: Storage
    publisher: Publisher
    registry: Registry
    code_version: str
    target: DeployTarget = field(default_factory=LocalTarget)
    canary_percent: int = 0
    promote_after: int = 0
    compile_onnx: bool = True
    precompiled: Precompiled = field(default_factory=Precompiled)
    # Sizes and prices (MLPIPE_COST_SIZES, MLPIPE_PRICES) of the estimate an ended run records.
    cost_sizes: str = ""
    prices: str = ""

    def __call__(self, message: PushMessage) -> StepResult:
        return Router(
            {
                TRAINING_COMPLETED: lambda trained, m: precompile(trained, self),
                EVALUATION_COMPLETED: lambda evaluation, m: deploy(evaluation, self),
            },
            EVALUATION_COMPLETED,
        )(message)


def _gate_summary(evaluation: events_pb2.EvaluationCompleted) -> str:
    failed = [
        f"{g.name}: {g.value:.4f} {'<' if events.gate_comparison(g) == '>=' else '>'} {g.threshold}"
        for g in evaluation.gates
        if not g.passed
    ]
    return "quality gates failed: " + "; ".join(failed) if failed else ""


def holdout_frame(
    storage: Storage, evaluation: events_pb2.EvaluationCompleted | events_pb2.TrainingCompleted
) -> pd.DataFrame:
    """The run's holdout rows: runs/<run_id>/split.json over the exact dataset bytes."""
    split_doc = storage.read_json(layout.RunPaths(evaluation.context.run_id).split)
    if split_doc is None:
        return pd.DataFrame()
    ref = evaluation.dataset
    obj = storage.read(storage.path_of(ref.uri), generation=ref.generation or None)
    if obj is None or (ref.sha256 and sha256_hex(obj.data) != ref.sha256):
        return pd.DataFrame()
    frame = read_dataset(obj.data, events.data_format(ref) or "csv", ref.uri)
    return frame.iloc[Split.from_json(split_doc).holdout]


def compile_for(
    storage: Storage,
    evaluation: events_pb2.EvaluationCompleted | events_pb2.TrainingCompleted,
    artifact: bytes,
    enabled: bool,
) -> CompileResult:
    """(the ONNX verdict, the bundle) for a verified artifact."""
    # Verified against the evaluated sha256 by the caller before unpickling.
    bundle = joblib.load(io.BytesIO(artifact))
    if not enabled:
        return Compiled(
            SKLEARN,
            "ONNX compilation is off (MLPIPE_COMPILE_ONNX=false)",
            schema_from_bundle(bundle),
        ), bundle
    holdout = holdout_frame(storage, evaluation)
    compiled = compile_model(bundle, holdout)
    if holdout.empty:
        compiled.note = "the run's split or dataset is not readable: " + compiled.note
    return compiled, bundle


def register_version(
    deps: Deployer, evaluation: events_pb2.EvaluationCompleted, artifact: bytes
) -> ModelVersion:
    run_id = evaluation.context.run_id
    existing = deps.registry.version_for_run(evaluation.model_name, run_id)
    if existing is not None:
        found = deps.registry.get(evaluation.model_name, existing)
        if found is not None:
            return found
    early = deps.precompiled.take((run_id, evaluation.model_sha256))
    if early is None:
        deps.precompiled.warmed()
    compiled, bundle = early or compile_for(deps.storage, evaluation, artifact, deps.compile_onnx)
    log.info("runtime %s: %s", compiled.runtime, compiled.note)
    extra = {ONNX_FILE: compiled.onnx} if compiled.runtime == ONNX and compiled.onnx else {}
    version, _created = deps.registry.register(
        evaluation.model_name,
        run_id,
        artifact,
        info={
            "dataset": events.to_dict(evaluation.dataset),
            "config_sha256": evaluation.context.config_sha256,
            # What serves it is labelled with its pipeline (targets.version_labels).
            "pipeline": evaluation.context.pipeline,
            "code_version": evaluation.context.code_version,
            "metrics": dict(evaluation.metrics),
            "gates": [events.to_dict(g) for g in evaluation.gates],
            "lineage_uri": deps.storage.uri(layout.RunPaths(run_id).lineage),
            "metrics_uri": evaluation.metrics_uri,
            "task": str(bundle.get("task", "")),
            "target": str(bundle.get("target", "")),
            "classes": [str(c) for c in bundle.get("classes", [])],
            "input_schema": [f.to_json() for f in compiled.schema],
            "runtime": compiled.runtime,
            "runtime_note": compiled.note,
            "runtime_check": compiled.details,
        },
        extra_artifacts=extra,
    )
    fault_point("deployer.after_register")
    return version


def roll_out(deps: Deployer, model: str, version: int) -> tuple[bool, int | None, str, str]:
    """Promote `version`, or start it as a canary. (moved, previous champion, alias, action)."""
    champion = deps.registry.alias(model, CHAMPION)
    if deps.canary_percent > 0 and champion is not None and champion != version:
        started, _ = deps.registry.start_canary(
            model, version, deps.canary_percent, deps.promote_after
        )
        current = deps.registry.traffic(model)
        return started or current.canary == version, champion, CANARY, "canary"
    moved, previous = deps.registry.move_alias(model, version)
    return moved or previous == version, previous, CHAMPION, "promote"


def precompile(trained: events_pb2.TrainingCompleted, deps: Deployer) -> StepResult:
    """Start compiling a freshly trained model while it is being evaluated."""
    run_id = trained.context.run_id
    if not deps.compile_onnx:
        return StepResult("ignored", {"reason": "ONNX compilation is off"}, run_id=run_id)
    if not layout.RUN_ID_PATTERN.match(run_id) or not trained.model_sha256:
        return permanent(
            PermanentError(
                "invalid_message",
                f"TrainingCompleted lacks a valid run_id/model_sha256 ({run_id!r})",
            )
        )
    if deps.storage.exists(layout.RunPaths(run_id).deployment):
        return StepResult("ignored", {"reason": "already deployed"}, run_id=run_id)

    def compile_now() -> CompileResult:
        artifact = deps.storage.read(deps.storage.path_of(trained.model_uri))
        if artifact is None or sha256_hex(artifact.data) != trained.model_sha256:
            raise ValueError(f"{trained.model_uri} is missing or differs from its sha256")
        return compile_for(deps.storage, trained, artifact.data, enabled=True)

    started = deps.precompiled.start((run_id, trained.model_sha256), compile_now)
    return StepResult("compiling" if started else "duplicate", {}, run_id=run_id)


def deploy(evaluation: events_pb2.EvaluationCompleted, deps: Deployer) -> StepResult:
    """On the step protocol: skip if `deployment.json` is recorded → decide → record → publish.
    No claim: registration is idempotent on the run (the registry's per-run claim)."""
    run_id = evaluation.context.run_id
    if not layout.RUN_ID_PATTERN.match(run_id) or not evaluation.model_name:
        return permanent(
            PermanentError(
                "invalid_message",
                f"EvaluationCompleted lacks a valid run_id/model_name ({run_id!r})",
            )
        )
    result = run_step(
        storage=deps.storage,
        publisher=deps.publisher,
        stage="deployer",
        run_id=run_id,
        skip=Recorded(layout.RunPaths(run_id).deployment, events_pb2.DeploymentCompleted),
        work=lambda: decide(evaluation, deps),
        done=lambda outcome: _deployed(outcome, run_id),
    )
    if result.status in RUN_ENDED:
        # The decision is recorded (a redelivery finds it recorded): the run has ended.
        progress.record_cost(deps, run_id)
    return result


# What `deploy` answers once the run's decision is recorded (gates failed, a newer version
# is there, or the rollout finished); "rolling_out" ends the run later (progress.advance).
RUN_ENDED = frozenset({"deployed", "not_deployed", "duplicate"})


def decide(
    evaluation: events_pb2.EvaluationCompleted, deps: Deployer
) -> events_pb2.DeploymentCompleted | StepResult:
    """The pure step: the DeploymentCompleted to record (not deployed: gates failed, or a newer
    version is already there), or what the rollout did (it records a deployment itself, once
    the target has finished: mlpipe_deployer.progress)."""
    run_id = evaluation.context.run_id
    model = evaluation.model_name
    outcome = events_pb2.DeploymentCompleted(
        context=events.next_context(
            evaluation.context, producer="deployer", code_version=deps.code_version
        ),
        dataset=evaluation.dataset,
        model_name=model,
        model_alias=events.MODEL_ALIAS.of(CHAMPION),
        deploy_target=events.DEPLOY_TARGET.of(deps.target.name),
        requested_by="deployer",
    )
    if not evaluation.passed:
        outcome.deployed = False
        outcome.reason = _gate_summary(evaluation) or "evaluation did not pass"
        return outcome
    artifact = deps.storage.read(deps.storage.path_of(evaluation.model_uri))
    if artifact is None or sha256_hex(artifact.data) != evaluation.model_sha256:
        raise PermanentError(
            "artifact_mismatch", f"{evaluation.model_uri} is missing or differs from its sha256"
        )
    version = register_version(deps, evaluation, artifact.data)
    deployed, previous, alias, action = roll_out(deps, model, version.version)
    outcome.version = version.version
    outcome.model_uri = version.model_uri
    outcome.model_sha256 = version.model_sha256
    outcome.previous_version = previous or 0
    outcome.deployed = deployed
    outcome.model_alias = events.MODEL_ALIAS.of(alias)
    outcome.rollout_action = events.ROLLOUT_ACTION.of(action)
    outcome.runtime = str(version.info.get("runtime", SKLEARN))
    outcome.runtime_note = str(version.info.get("runtime_note", ""))
    if not deployed:
        outcome.reason = f"a newer version (v{previous}) is already {alias}"
        return outcome
    outcome.traffic.extend(traffic_shares(deps.registry.traffic(model)))
    advanced = progress.advance(deps, model, outcome, run_id)
    finished = advanced.for_run(run_id)
    if finished is None:
        # Acknowledged: the rollout's record finishes it (mlpipe_deployer.progress).
        return StepResult(
            "rolling_out",
            {"version": outcome.version, "operations": advanced.rollout.operations},
            run_id=run_id,
        )
    return _deployed(finished, run_id)


def _deployed(outcome: events_pb2.DeploymentCompleted, run_id: str) -> StepResult:
    log.info(
        "%s %s v%d: %s",
        "deployed" if outcome.deployed else "did not deploy",
        outcome.model_name,
        outcome.version,
        outcome.reason or f"now {events.model_alias(outcome)} ({outcome.runtime})",
    )
    return StepResult(
        "deployed" if outcome.deployed else "not_deployed",
        {"version": outcome.version, "reason": outcome.reason, "runtime": outcome.runtime},
        run_id=run_id,
    )
