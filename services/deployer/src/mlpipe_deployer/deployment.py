"""The deployer's step: EvaluationCompleted → (on pass) register a version, move the champion.

Registration is idempotent on run_id (see mlpipe.registry); the recorded DeploymentCompleted
makes a redelivery re-publish the same outcome instead of deploying again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlpipe import events, lineage
from mlpipe.errors import PermanentError
from mlpipe.publishing import Publisher
from mlpipe.push import PushMessage
from mlpipe.registry import CHAMPION, Registry
from mlpipe.service import StepResult
from mlpipe.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)


@dataclass
class Deployer:
    storage: Storage
    publisher: Publisher
    registry: Registry
    code_version: str
    target: str = "local"

    def __call__(self, message: PushMessage) -> StepResult:
        return deploy(message, self)


def _gate_summary(evaluation: events_pb2.EvaluationCompleted) -> str:
    failed = [
        f"{g.name}: {g.value:.4f} {'<' if g.comparison == '>=' else '>'} {g.threshold}"
        for g in evaluation.gates
        if not g.passed
    ]
    return "quality gates failed: " + "; ".join(failed) if failed else ""


def deploy(message: PushMessage, deps: Deployer) -> StepResult:
    try:
        evaluation = events.decode(
            events_pb2.EvaluationCompleted,
            message.data,
            message.attributes.get(events.SCHEMA_ENCODING_ATTR, ""),
        )
    except events.EventDecodeError as exc:
        raise PermanentError("invalid_message", str(exc)) from exc
    run_id = evaluation.context.run_id
    if not lineage.RUN_ID_PATTERN.match(run_id) or not evaluation.model_name:
        raise PermanentError(
            "invalid_message", f"EvaluationCompleted lacks a valid run_id/model_name ({run_id!r})"
        )
    paths = lineage.RunPaths(run_id)
    recorded = deps.storage.read(paths.deployment)
    if recorded is not None:
        deps.publisher.publish(events.from_json(events_pb2.DeploymentCompleted, recorded.data))
        return StepResult(
            "duplicate", {"detail": "already decided; event re-published"}, run_id=run_id
        )

    outcome = events_pb2.DeploymentCompleted(
        context=events.next_context(
            evaluation.context, producer="deployer", code_version=deps.code_version
        ),
        dataset=evaluation.dataset,
        model_name=evaluation.model_name,
        alias=CHAMPION,
        target=deps.target,
    )
    if not evaluation.passed:
        outcome.deployed = False
        outcome.reason = _gate_summary(evaluation) or "evaluation did not pass"
    else:
        artifact = deps.storage.read(deps.storage.path_of(evaluation.model_uri))
        if artifact is None or sha256_hex(artifact.data) != evaluation.model_sha256:
            raise PermanentError(
                "artifact_mismatch", f"{evaluation.model_uri} is missing or differs from its sha256"
            )
        version, _created = deps.registry.register(
            evaluation.model_name,
            run_id,
            artifact.data,
            info={
                "dataset": events.to_dict(evaluation.dataset),
                "config_sha256": evaluation.context.config_sha256,
                "code_version": evaluation.context.code_version,
                "metrics": dict(evaluation.metrics),
                "gates": [events.to_dict(g) for g in evaluation.gates],
                "lineage_uri": deps.storage.uri(paths.lineage),
                "metrics_uri": evaluation.metrics_uri,
            },
        )
        moved, previous = deps.registry.move_alias(evaluation.model_name, version.version)
        outcome.version = version.version
        outcome.model_uri = version.model_uri
        outcome.model_sha256 = version.model_sha256
        outcome.previous_version = previous or 0
        outcome.deployed = moved or previous == version.version
        if not outcome.deployed:
            outcome.reason = f"version {previous} is already {CHAMPION} and is newer"
    if deps.storage.create_if_absent(paths.deployment, events.to_json(outcome).encode()) is None:
        recorded = deps.storage.read(paths.deployment)
        if recorded is not None:
            outcome = events.from_json(events_pb2.DeploymentCompleted, recorded.data)
    deps.publisher.publish(outcome)
    log.info(
        "%s %s v%d: %s",
        "deployed" if outcome.deployed else "did not deploy",
        outcome.model_name,
        outcome.version,
        outcome.reason or "now champion",
    )
    return StepResult(
        "deployed" if outcome.deployed else "not_deployed",
        {"version": outcome.version, "reason": outcome.reason},
        run_id=run_id,
    )
