"""What the notifier tells, built from the events it receives: one Notice per event worth
telling, with a key that every delivery of that event derives alike.

The kinds are a closed set: a new one is a member of NoticeKind, a subscription in
mlpipe.messaging.topology and a builder here; channels that list no `events` receive it too.

A notice's key names its record (mlpipe.store.layout.notification_path) and is sent as the
`Idempotency-Key` header: it is derived from what identifies the event's subject (the failed
input, the run, the drift check, the rollout step), never from the Pub/Sub message, so a
redelivery, or the same event published again under a new message id, is the same notice.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from mlpipe.messaging import events
from mlpipe.v1 import events_pb2


class NoticeKind(enum.StrEnum):
    FAILURE = "failure"  # a PipelineFailed, from any stage
    GATE_BLOCKED = "gate_blocked"  # an evaluation whose quality gates did not pass
    DRIFT = "drift"  # a DriftDetected
    CANARY = "canary"  # a rollout milestone: canary started, promoted, or a rollback
    APPROVAL = "approval"  # a promotion waiting for a person's approval, and its decision


class Milestone(enum.StrEnum):
    """The rollout steps a canary notice reports."""

    STARTED = "started"  # a canary serves its share and waits for a promotion
    PROMOTED = "promoted"  # the canary became the champion
    ROLLED_BACK = "rolled_back"  # a canary stopped, or a champion moved back


# The `requested_by` of the deployer's own deploy step: a version promoted there went straight
# to champion, it was never a canary. Promotions of a canary name who asked (cli, console,
# predictor).
DEPLOY_STEP = "deployer"
# A detail line is at most this long, and names at most this many gates or features.
DETAIL_CHARS = 300
LISTED = 3
# What a key may not hold (an object name segment: see mlpipe.store.layout.NOTIFICATION_NAME).
KEY_PART = re.compile(r"[^A-Za-z0-9_.=-]+|\.\.+")


@dataclass(frozen=True)
class Notice:
    """One thing to tell, in plain text: a title line, a few detail lines and a link."""

    kind: NoticeKind
    key: str
    title: str
    details: tuple[str, ...]
    event_type: str
    occurred_at: str  # RFC 3339, when the event happened
    link: str = ""  # the console page to open ("" without MLPIPE_CONSOLE_URL)
    link_text: str = ""
    run_id: str = ""
    model: str = ""
    version: int = 0
    stage: str = ""
    reason: str = ""
    milestone: str = ""


def notice_key(*parts: str) -> str:
    """Parts joined by '-', each made safe for an object name; a key too long keeps its start
    and ends with a digest of the whole, so two long keys never collide."""
    key = "-".join(KEY_PART.sub("_", p).strip("._") or "_" for p in parts)
    if len(key) <= 128:
        return key
    return f"{key[:111]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _short(text: str, limit: int = DETAIL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listed(items: list[str]) -> list[str]:
    """The first few items, and how many more there are."""
    shown = items[:LISTED]
    if len(items) > LISTED:
        shown.append(f"and {len(items) - LISTED} more")
    return shown


def _when(*stamps: Timestamp) -> str:
    """The first timestamp that is set, as RFC 3339 ("" when none is)."""
    for stamp in stamps:
        if stamp.seconds or stamp.nanos:
            return str(stamp.ToJsonString())
    return ""


def _link(console_url: str, path: str) -> str:
    return f"{console_url}{path}" if console_url else ""


def failure_notice(failed: events_pb2.PipelineFailed, console_url: str) -> Notice:
    """`iris run 6803… failed in trainer: missing_column`. Keyed on the stage, the run and the
    failed input (the message that carried it, else where it was kept, else the failure event
    itself): a stage reports one input's failure once however often it is delivered."""
    ctx = failed.context
    stage = events.pipeline_stage(failed) or ctx.producer or "unknown"
    pipeline = ctx.pipeline or failed.dataset.name
    subject = f"{pipeline} run {ctx.run_id}" if ctx.run_id else f"{pipeline or 'an'} input"
    identity = (
        failed.source_message_id
        or failed.quarantine_uri
        or hashlib.sha256(events.encode(failed)).hexdigest()
    )
    details = [_short(failed.message)] if failed.message else []
    if failed.quarantine_uri:
        details.append(f"input kept at {failed.quarantine_uri}")
    return Notice(
        kind=NoticeKind.FAILURE,
        key=notice_key(
            "failure",
            stage,
            ctx.run_id or "none",
            hashlib.sha256(identity.encode()).hexdigest()[:16],
        ),
        title=f"{subject} failed in {stage}: {failed.reason or 'unknown reason'}",
        details=tuple(details),
        event_type=failed.DESCRIPTOR.full_name,
        occurred_at=_when(ctx.event_time),
        link=_link(console_url, f"/runs/{ctx.run_id}" if ctx.run_id else "/failures"),
        link_text=f"run {ctx.run_id}" if ctx.run_id else "failures",
        run_id=ctx.run_id,
        stage=stage,
        reason=failed.reason,
    )


def _gate_line(gate: events_pb2.GateResult) -> str:
    """As the deployer states a failed gate: `min_accuracy: 0.6100 < 0.75`."""
    sign = "<" if events.gate_comparison(gate) == ">=" else ">"
    return f"{gate.name}: {gate.value:.4f} {sign} {gate.threshold:g}"


def gate_notice(evaluation: events_pb2.EvaluationCompleted, console_url: str) -> Notice | None:
    """`iris run 6803… blocked by its quality gates`, or None when the gates passed. Keyed on
    the run: a run is evaluated once."""
    if evaluation.passed:
        return None
    ctx = evaluation.context
    failed = [_gate_line(g) for g in evaluation.gates if not g.passed]
    details = ["; ".join(_listed(failed)) or "the evaluation did not pass"]
    if evaluation.champion_version:
        details.append(f"{evaluation.model_name} v{evaluation.champion_version} keeps serving")
    return Notice(
        kind=NoticeKind.GATE_BLOCKED,
        key=notice_key("gate_blocked", ctx.run_id),
        title=f"{ctx.pipeline or evaluation.model_name} run {ctx.run_id} blocked by its quality "
        f"gates: {evaluation.model_name} not deployed",
        details=tuple(_short(d) for d in details),
        event_type=evaluation.DESCRIPTOR.full_name,
        occurred_at=_when(ctx.event_time),
        link=_link(console_url, f"/runs/{ctx.run_id}"),
        link_text=f"run {ctx.run_id}",
        run_id=ctx.run_id,
        model=evaluation.model_name,
        reason=f"{len(failed)} gate(s) failed",
    )


def drift_notice(drift: events_pb2.DriftDetected, console_url: str) -> Notice:
    """`drift in iris-classifier v3: petal_width, sepal_length`. Keyed on the model and the
    check, as the evaluator keys the check itself."""
    found = [f for f in (*drift.features, drift.prediction) if f.drifted]
    names = [f.name for f in found]
    details = [_short(f"{f.name}: {f.reason}") for f in found[:LISTED] if f.reason]
    if drift.retrain_note:
        details.append(_short(drift.retrain_note))
    return Notice(
        kind=NoticeKind.DRIFT,
        key=notice_key("drift", drift.model_name, drift.check_id),
        title=f"drift in {drift.model_name} v{drift.version}: {', '.join(_listed(names))} "
        f"({drift.served_samples} served rows, check {drift.check_id})",
        details=tuple(details),
        event_type=drift.DESCRIPTOR.full_name,
        occurred_at=_when(drift.checked_at, drift.context.event_time),
        link=_link(console_url, "/drift"),
        link_text="drift checks",
        run_id=drift.context.run_id,
        model=drift.model_name,
        version=drift.version,
        reason=", ".join(names),
    )


def milestone(deployment: events_pb2.DeploymentCompleted) -> Milestone | None:
    """The canary milestone a DeploymentCompleted records, if any (a version deployed straight
    to champion, or not deployed, is none)."""
    if not deployment.deployed:
        return None
    action = events.rollout_action(deployment)
    if action == "canary":
        return Milestone.STARTED
    if action == "rollback":
        return Milestone.ROLLED_BACK
    if action == "promote" and deployment.requested_by not in ("", DEPLOY_STEP):
        return Milestone.PROMOTED
    return None


def _canary_share(deployment: events_pb2.DeploymentCompleted) -> int:
    return next(
        (
            t.percent
            for t in deployment.traffic
            if t.version == deployment.version and events.model_alias(t) == "canary"
        ),
        0,
    )


def canary_notice(deployment: events_pb2.DeploymentCompleted, console_url: str) -> Notice | None:
    """A canary started and waiting, promoted, or a rollback; None for any other deployment.
    Keyed on the model, the version the step is about (a rollback's: the one it removed) and
    the milestone: each happens once per version."""
    step = milestone(deployment)
    if step is None:
        return None
    model, version, previous = (
        deployment.model_name,
        deployment.version,
        deployment.previous_version,
    )
    by = f"asked by {deployment.requested_by}" if deployment.requested_by else ""
    if step is Milestone.STARTED:
        subject = version
        share = _canary_share(deployment)
        title = (
            f"{model} v{version} is a canary at {share}% beside v{previous}, waiting for promotion"
            if previous
            else f"{model} v{version} is a canary at {share}%, waiting for promotion"
        )
        details = [f"promote: mlpipe promote {model} · roll back: mlpipe rollback {model}"]
    elif step is Milestone.PROMOTED:
        subject = version
        title = f"{model} canary v{version} promoted to champion" + (
            f" (was v{previous})" if previous else ""
        )
        details = [d for d in (deployment.reason, by) if d]
    else:
        subject = previous or version
        title = f"{model} rolled back: {deployment.reason or f'v{version} serves 100%'}"
        details = [by] if by else []
    return Notice(
        kind=NoticeKind.CANARY,
        key=notice_key("canary", model, f"v{subject}", step.value),
        title=title,
        details=tuple(_short(d) for d in details),
        event_type=deployment.DESCRIPTOR.full_name,
        occurred_at=_when(deployment.context.event_time),
        link=_link(console_url, "/models"),
        link_text="models",
        run_id=deployment.context.run_id,
        model=model,
        version=subject,
        reason=deployment.reason,
        milestone=step.value,
    )


def approval_notice(request: events_pb2.ApprovalRequested, console_url: str) -> Notice:
    """`iris-classifier v3 waits for approval to reach prod (from staging)`. Keyed on the
    request: each is asked for once."""
    expires = _when(request.expires_at)
    details = [
        f"approve: mlpipe approve {request.approval_id} --env {request.to_env} · "
        f"reject: mlpipe reject {request.approval_id} --env {request.to_env} --reason TEXT",
    ]
    if expires:
        details.append(f"asked by {request.requested_by or 'unknown'}; expires {expires}")
    return Notice(
        kind=NoticeKind.APPROVAL,
        key=notice_key("approval", request.approval_id, "requested"),
        title=f"{request.model_name} v{request.version} waits for approval to reach "
        f"{request.to_env} (from {request.from_env})",
        details=tuple(_short(d) for d in details),
        event_type=request.DESCRIPTOR.full_name,
        occurred_at=_when(request.requested_at, request.context.event_time),
        link=_link(console_url, "/models"),
        link_text="models",
        run_id=request.context.run_id,
        model=request.model_name,
        version=request.version,
        reason=f"promotion to {request.to_env}",
    )


def decision_notice(decided: events_pb2.ApprovalDecided, console_url: str) -> Notice:
    """`iris-classifier v3 approved for prod by ana@…` (or rejected, with the reason). Keyed on
    the request: each is decided once."""
    approved = decided.decision == events_pb2.APPROVAL_DECISION_APPROVED
    word = "approved" if approved else "rejected"
    details = [f"promotion run {decided.run_id} started in {decided.to_env}"] if approved else []
    if decided.reason:
        details.append(_short(decided.reason))
    return Notice(
        kind=NoticeKind.APPROVAL,
        key=notice_key("approval", decided.approval_id, word),
        title=f"{decided.model_name} v{decided.version} {word} for {decided.to_env} by "
        f"{decided.decided_by or 'unknown'}",
        details=tuple(details),
        event_type=decided.DESCRIPTOR.full_name,
        occurred_at=_when(decided.decided_at, decided.context.event_time),
        link=_link(console_url, f"/runs/{decided.run_id}" if approved else "/models"),
        link_text=f"run {decided.run_id}" if approved else "models",
        run_id=decided.run_id or decided.context.run_id,
        model=decided.model_name,
        version=decided.version,
        reason=decided.reason or word,
    )
