"""What the notifier's unit and integration tests share: the events it receives, as the
pipeline's services publish them, and the signature check a receiver runs, read from
docs/notifications.md (so the tests prove the documented recipe)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlpipe.messaging import events
from mlpipe.v1 import events_pb2

DOCS = Path(__file__).resolve().parents[1] / "docs" / "notifications.md"
RUN = "680351e2d2b6804f"
WHEN = dt.datetime(2026, 11, 23, 9, 30, tzinfo=dt.UTC)


def context(producer: str, run_id: str = RUN) -> events_pb2.RunContext:
    return events_pb2.RunContext(
        run_id=run_id,
        pipeline="iris",
        producer=producer,
        code_version="c0ffee",
        event_time=events.timestamp(WHEN),
    )


def failed(source_message_id: str = "4242", run_id: str = RUN) -> events_pb2.PipelineFailed:
    return events_pb2.PipelineFailed(
        context=context("trainer", run_id),
        pipeline_stage=events.PIPELINE_STAGE.of("trainer"),
        reason="missing_column",
        message="column 'species' is missing from datasets/iris/dt=2026-11-23/upload-1.csv",
        quarantine_uri="gs://b/quarantine/missing_column/trainer-4242",
        source_message_id=source_message_id,
        source_subscription="projects/p/subscriptions/trainer-push",
    )


def gate(name: str, value: float, threshold: float, passed: bool) -> events_pb2.GateResult:
    return events_pb2.GateResult(
        name=name,
        metric=name.removeprefix("min_"),
        threshold=threshold,
        value=value,
        passed=passed,
        kind="absolute",
        gate_comparison=events.GATE_COMPARISON.of(">="),
    )


def evaluated(passed: bool = False) -> events_pb2.EvaluationCompleted:
    return events_pb2.EvaluationCompleted(
        context=context("evaluator"),
        model_name="iris-classifier",
        passed=passed,
        gates=[
            gate("min_accuracy", 0.61, 0.75, passed),
            gate("min_per_class_f1[setosa]", 0.9, 0.7, True),
        ],
        champion_version=3,
    )


def drifted(check_id: str = "daily-2026-11-23") -> events_pb2.DriftDetected:
    features = [
        events_pb2.FeatureDrift(
            name="petal_width", kind="numeric", psi=0.41, drifted=True, reason="PSI 0.41 > 0.2"
        ),
        events_pb2.FeatureDrift(name="sepal_length", kind="numeric", psi=0.02),
    ]
    return events_pb2.DriftDetected(
        context=context("evaluator"),
        model_name="iris-classifier",
        version=3,
        check_id=check_id,
        served_samples=500,
        reference_rows=120,
        features=features,
        retrain_note="retraining requested (drift-daily-2026-11-23)",
        checked_at=events.timestamp(WHEN),
    )


def _share(version: int, percent: int, alias: str) -> events_pb2.TrafficShare:
    return events_pb2.TrafficShare(
        version=version, percent=percent, model_alias=events.MODEL_ALIAS.of(alias)
    )


def deployed(
    action: str, version: int = 4, previous: int = 3, requested_by: str = "deployer"
) -> events_pb2.DeploymentCompleted:
    alias = "canary" if action == "canary" else "champion"
    traffic = (
        [_share(previous, 90, "champion"), _share(version, 10, "canary")]
        if action == "canary"
        else [_share(version, 100, "champion")]
    )
    reasons = {
        "canary": "",
        "promote": f"canary v{version} promoted" if requested_by != "deployer" else "",
        "rollback": f"canary v{previous} stopped; v{version} keeps 100%",
    }
    return events_pb2.DeploymentCompleted(
        context=context("deployer"),
        model_name="iris-classifier",
        version=version,
        deployed=True,
        previous_version=previous,
        model_alias=events.MODEL_ALIAS.of(alias),
        rollout_action=events.ROLLOUT_ACTION.of(action),
        traffic=traffic,
        requested_by=requested_by,
        reason=reasons[action],
        deploy_target=events.DEPLOY_TARGET.of("local"),
    )


def approval_requested(approval_id: str = "a1b2c3d4e5f6") -> events_pb2.ApprovalRequested:
    return events_pb2.ApprovalRequested(
        context=context("promotion"),
        approval_id=approval_id,
        approval_uri=f"gs://prod-bucket/approvals/{approval_id}.json",
        model_name="iris-classifier",
        version=3,
        from_env="staging",
        to_env="prod",
        requested_by="ana@example.com",
        requested_at=events.timestamp(WHEN),
        expires_at=events.timestamp(WHEN + dt.timedelta(hours=72)),
    )


def approval_decided(approved: bool = True) -> events_pb2.ApprovalDecided:
    return events_pb2.ApprovalDecided(
        context=context("promotion"),
        approval_id="a1b2c3d4e5f6",
        model_name="iris-classifier",
        version=3,
        from_env="staging",
        to_env="prod",
        decision=events_pb2.APPROVAL_DECISION_APPROVED
        if approved
        else events_pb2.APPROVAL_DECISION_REJECTED,
        decided_by="bo@example.com",
        decided_at=events.timestamp(WHEN),
        reason="" if approved else "the holdout is a week old",
        run_id="7a0b1c2d3e4f5a6b" if approved else "",
    )


def documented_verify() -> Callable[..., bool]:
    """`verify(secret, headers, body, tolerance=300)`, exactly as the docs write it."""
    section = DOCS.read_text().split("## Verifying a webhook's signature", 1)[1]
    (snippet,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, str(DOCS), "exec"), namespace)
    return namespace["verify"]  # type: ignore[no-any-return]
