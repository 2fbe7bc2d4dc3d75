"""Promoting a registered model version from one environment to the next (docs/promotion.md):
`mlpipe promote MODEL VERSION --to ENV`, `mlpipe approve` and `mlpipe reject` call these, and
the console reads the same records.

1. Checks, before anything is written: the order (forward only), the version complete in the
   source registry, its artifacts matching their sha256, its run's recorded evaluation passed
   (mlpipe.store.promotions.verify_source).
2. Into an environment with `approval: required`, a promotion first creates an approval
   request (mlpipe.store.approvals) and publishes ApprovalRequested; `approve` decides it and
   carries the promotion out, `reject` records why not.
3. Carrying it out (`carry_out`, which itself refuses an approval-required target without an
   approved request): copy the version's artifacts and its run's records into a run of the
   target's (`layout.promoted_run_id`), each read back and checked; write its config (the
   run's, with the target's gates), its holdout split (the target's own dataset of that name
   when it has a usable one, else the copied one) and a lineage naming the source; record and
   publish the TrainingCompleted that starts the target's evaluation, so its evaluator and
   deployer take it from there as for a run trained there. A record per promotion
   (`promotions/<model>/<version>-from-<env>.json`) makes a repeated promotion do nothing new.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from mlpipe import tracing
from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import ConfigError, PipelineConfig, config_path, parse_config
from mlpipe.runtime.steps import record_and_publish
from mlpipe.store import approvals as ap
from mlpipe.store import layout
from mlpipe.store import promotions as pr
from mlpipe.store.approvals import Actor, ApprovalRequest, Approvals
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)

PRODUCER = "promotion"
# The registered pipeline config a promoted run's gates were read from, kept beside it.
PIPELINE_CONFIG = "pipeline-config.yaml"

# What a call did (Outcome.status).
REFUSED = "refused"  # a check failed: nothing was written
REQUESTED = "requested"  # an approval request was created
PENDING = "pending"  # an earlier request for it still waits
PROMOTED = "promoted"  # carried out now: the target's evaluation is started
ALREADY_PROMOTED = "already_promoted"  # carried out before: nothing new
REJECTED = "rejected"  # the request was rejected now
DECIDED = "already_decided"  # the request had been decided: nothing changed
EXPIRED = "expired"  # the request expired: nothing changed
NOT_FOUND = "not_found"
SUCCEEDED = frozenset({REQUESTED, PENDING, PROMOTED, ALREADY_PROMOTED, REJECTED})


@dataclass(frozen=True)
class Place:
    """One environment as a promotion sees it: its name (the environment file's), project,
    bucket and publisher, and what its file says of approvals."""

    env: str
    project: str
    storage: Storage
    publisher: Publisher
    approval_required: bool = False
    approval_expires_hours: float = 72.0

    @property
    def bucket(self) -> str:
        return self.storage.bucket_name


@dataclass(frozen=True)
class Outcome:
    status: str
    message: str
    reason: str = ""  # a refusal's code (mlpipe.store.promotions.Refusal.reason)
    approval: ApprovalRequest | None = None
    promotion: Mapping[str, Any] | None = None
    run_id: str = ""  # the run started in the target

    @property
    def ok(self) -> bool:
        return self.status in SUCCEEDED


def _now(now: dt.datetime | None) -> dt.datetime:
    return now or dt.datetime.now(dt.UTC)


def _at(when: dt.datetime) -> str:
    return f"{when.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


def _refused(refusal: pr.Refusal) -> Outcome:
    return Outcome(REFUSED, refusal.message, refusal.reason)


# --- promote --------------------------------------------------------------------------------------
def promote(
    source: Place,
    target: Place,
    model: str,
    version: int,
    actor: Actor,
    order: Sequence[str],
    now: dt.datetime | None = None,
) -> Outcome:
    """Promote `model` v`version` from `source` to `target`: carried out at once, or (into an
    approval-required environment) asked for; a repeated call finds what the first did."""
    now = _now(now)
    try:
        pr.check_direction(order, source.env, target.env)
    except pr.Refusal as refusal:
        return _refused(refusal)
    done = pr.read_promotion(target.storage, model, version, source.env)
    if done is not None and done.state == pr.PUBLISHED:
        return _already(target, model, version, source.env, done)
    try:
        checked = pr.verify_source(source.storage, source.env, source.project, model, version)
    except pr.Refusal as refusal:
        return _refused(refusal)
    if not target.approval_required:
        return carry_out(source, target, checked, actor, now=now)
    requests = Approvals(target.storage).for_version(model, version, source.env, target.env)
    approved = [r for r in requests if r.state == ap.APPROVED]
    if approved:
        # Approved before, its promotion not finished (the approver's process stopped): finish it.
        return carry_out(source, target, checked, actor, approval_id=approved[-1].id, now=now)
    waiting = [r for r in requests if r.status(now) == ap.PENDING]
    if waiting:
        request = waiting[-1]
        return Outcome(
            PENDING,
            f"{model} v{version} {source.env} → {target.env} already waits for approval "
            f"{request.id} (asked by {request.requested_by} at {_at(request.requested_at)}, "
            f"expires {_at(request.expires_at)})",
            approval=request,
        )
    return request_approval(source, target, checked, actor, now)


def request_approval(
    source: Place, target: Place, checked: pr.SourceVersion, actor: Actor, now: dt.datetime
) -> Outcome:
    """Record a pending request in the target's bucket, then publish ApprovalRequested there."""
    record = ap.request_record(
        approval_id=ap.new_approval_id(),
        model=checked.model,
        version=checked.version.version,
        from_env=source.env,
        to_env=target.env,
        source=checked.describe(),
        requested_by=actor,
        requested_at=now,
        expires_hours=target.approval_expires_hours,
    )
    request = Approvals(target.storage).create(record)
    target.publisher.publish(
        events_pb2.ApprovalRequested(
            context=_context(checked.trained.context),
            approval_id=request.id,
            approval_uri=target.storage.uri(layout.approval_path(request.id)),
            model_name=request.model,
            version=request.version,
            from_env=request.from_env,
            to_env=request.to_env,
            source=_source_event(checked),
            requested_by=actor.name,
            requested_by_source=_actor_source(actor.source),
            requested_at=events.timestamp(request.requested_at),
            expires_at=events.timestamp(request.expires_at),
        )
    )
    log.info(
        "approval %s asked for %s v%d → %s", request.id, request.model, request.version, target.env
    )
    return Outcome(
        REQUESTED,
        f"{target.env} requires approval: request {request.id} for {request.model} "
        f"v{request.version} ({source.env} → {target.env}) waits until "
        f"{_at(request.expires_at)}; nothing is in {target.env} yet. "
        f"`mlpipe approve {request.id} --env {target.env}` carries it out, "
        f"`mlpipe reject {request.id} --env {target.env} --reason ...` refuses it",
        approval=request,
    )


def _already(
    target: Place, model: str, version: int, from_env: str, done: pr.PromotionRecord
) -> Outcome:
    return Outcome(
        ALREADY_PROMOTED,
        f"{model} v{version} was promoted {from_env} → {target.env} already "
        f"({target.storage.uri(layout.promotion_path(model, version, from_env))}, run "
        f"{done.run_id}): nothing new",
        promotion=done.record,
        run_id=done.run_id,
    )


# --- approve and reject -------------------------------------------------------------------------
def _not_pending(request: ApprovalRequest, target: Place, now: dt.datetime) -> Outcome | None:
    """The answer for a request that can no longer be decided, or None while it can."""
    if request.state != ap.PENDING:
        said = f"approval {request.id} was already {request.decided()}: nothing changed"
        if request.state == ap.APPROVED:
            done = pr.read_promotion(
                target.storage, request.model, request.version, request.from_env
            )
            if done is not None and done.state == pr.PUBLISHED:
                said += f" (its promotion started run {done.run_id})"
            else:
                said += (
                    f" (its promotion has not finished: `mlpipe promote {request.model} "
                    f"{request.version} --to {request.to_env} --from {request.from_env}` "
                    f"finishes it)"
                )
        return Outcome(DECIDED, said, approval=request)
    if request.expired(now):
        return Outcome(
            EXPIRED,
            f"approval {request.id} expired at {_at(request.expires_at)}: nothing "
            f"changed; `mlpipe promote {request.model} {request.version} --to {request.to_env}` "
            f"asks again",
            approval=request,
        )
    return None


def _lost(decided: ap.Decided, target: Place, now: dt.datetime) -> Outcome:
    """A decision that was not recorded: said as the request now stands."""
    return _not_pending(decided.request, target, now) or Outcome(
        DECIDED,
        f"approval {decided.request.id} changed meanwhile: nothing changed",
        approval=decided.request,
    )


def approve(
    source: Place,
    target: Place,
    approval_id: str,
    actor: Actor,
    order: Sequence[str],
    now: dt.datetime | None = None,
) -> Outcome:
    """Approve a pending request and carry its promotion out. The source is checked again
    first (and must still be the bytes that were asked for); a request that is expired or
    decided stays as it is."""
    now = _now(now)
    request = _find(target, approval_id)
    if request is None:
        return Outcome(
            NOT_FOUND,
            f"no approval {approval_id} in {target.env} (gs://{target.bucket}/{layout.APPROVALS})",
        )
    if request.from_env != source.env or request.to_env != target.env:
        return Outcome(
            REFUSED,
            f"approval {request.id} is for {request.from_env} → {request.to_env}, not "
            f"{source.env} → {target.env}",
            "wrong_envs",
            approval=request,
        )
    answer = _not_pending(request, target, now)
    if answer is not None:
        return answer
    try:
        pr.check_direction(order, source.env, target.env)
        checked = pr.verify_source(
            source.storage, source.env, source.project, request.model, request.version
        )
    except pr.Refusal as refusal:
        return Outcome(
            REFUSED,
            f"approval {request.id} stays pending: {refusal.message}",
            refusal.reason,
            request,
        )
    differs = pr.same_source(checked, request.source)
    if differs:
        return Outcome(
            REFUSED, f"approval {request.id} stays pending: {differs}", "source_changed", request
        )
    run_id = layout.promoted_run_id(source.env, source.project, request.model, request.version)
    promotion_uri = target.storage.uri(
        layout.promotion_path(request.model, request.version, source.env)
    )
    decided = Approvals(target.storage).decide(
        request, ap.APPROVED, actor, now, extra={"run_id": run_id, "promotion_uri": promotion_uri}
    )
    if not decided.done:
        return _lost(decided, target, now)
    _publish_decision(target, decided.request, _context(checked.trained.context))
    carried = carry_out(source, target, checked, actor, approval_id=request.id, now=now)
    return Outcome(
        carried.status,
        f"approval {request.id} approved by {actor.name} ({actor.source}); {carried.message}",
        carried.reason,
        decided.request,
        carried.promotion,
        carried.run_id,
    )


def reject(
    target: Place, approval_id: str, actor: Actor, reason: str, now: dt.datetime | None = None
) -> Outcome:
    """Reject a pending request, recording who, when and why; nothing is promoted."""
    now = _now(now)
    if not reason.strip():
        return Outcome(REFUSED, "a rejection needs a reason (--reason)", "no_reason")
    request = _find(target, approval_id)
    if request is None:
        return Outcome(
            NOT_FOUND,
            f"no approval {approval_id} in {target.env} (gs://{target.bucket}/{layout.APPROVALS})",
        )
    answer = _not_pending(request, target, now)
    if answer is not None:
        return answer
    decided = Approvals(target.storage).decide(
        request, ap.REJECTED, actor, now, reason=reason.strip()
    )
    if not decided.done:
        return _lost(decided, target, now)
    context = events.context(
        producer=PRODUCER,
        code_version="",
        run_id=str(request.source.get("run_id", "")),
        pipeline=str(request.source.get("pipeline", "")),
    )
    _publish_decision(target, decided.request, context)
    return Outcome(
        REJECTED,
        f"approval {request.id} ({request.model} v{request.version} {request.from_env} → "
        f"{request.to_env}) rejected by {actor.name} ({actor.source}): {reason.strip()}",
        approval=decided.request,
    )


def _actor_source(text: str) -> events_pb2.ActorSource.ValueType:
    """The event's enum for where a name came from; unspecified for a source it does not list
    (a record written by another tool), which the record itself still names."""
    return events.ACTOR_SOURCE.values.get(text, events_pb2.ACTOR_SOURCE_UNSPECIFIED)


def _find(target: Place, approval_id: str) -> ApprovalRequest | None:
    if not layout.APPROVAL_ID_PATTERN.match(approval_id):
        return None
    return Approvals(target.storage).get(approval_id)


def _publish_decision(
    target: Place, request: ApprovalRequest, context: events_pb2.RunContext
) -> None:
    record = request.record
    decided_at = ap.parse_time(record["decided_at"])
    target.publisher.publish(
        events_pb2.ApprovalDecided(
            context=context,
            approval_id=request.id,
            approval_uri=target.storage.uri(layout.approval_path(request.id)),
            model_name=request.model,
            version=request.version,
            from_env=request.from_env,
            to_env=request.to_env,
            decision=events.APPROVAL_DECISION.of(request.state),
            decided_by=str(record.get("decided_by", "")),
            decided_by_source=_actor_source(str(record.get("decided_by_source", ""))),
            decided_at=events.timestamp(decided_at),
            reason=str(record.get("reason", "")),
            run_id=str(record.get("run_id", "")),
        )
    )


# --- carrying a promotion out ---------------------------------------------------------------
@dataclass(frozen=True)
class Holdout:
    """What the target's evaluator scores the promoted model on."""

    dataset: events_pb2.DatasetRef
    split: bytes  # split.json over `dataset`
    source: str  # events.HOLDOUT_SOURCE: "target_dataset" or "copied"
    note: str
    rows: int


def _approval_problem(
    target: Place, approval_id: str, checked: pr.SourceVersion, from_env: str
) -> str:
    """'' when `approval_id` is an approved request for exactly this promotion."""
    if not approval_id:
        return "no approved request names it (`mlpipe promote` asks for one)"
    request = _find(target, approval_id)
    if request is None:
        return f"approval {approval_id} does not exist"
    if request.state != ap.APPROVED:
        return f"approval {approval_id} is {request.status(dt.datetime.now(dt.UTC))}, not approved"
    wanted = (checked.model, checked.version.version, from_env, target.env)
    if (request.model, request.version, request.from_env, request.to_env) != wanted:
        return (
            f"approval {approval_id} is for {request.model} v{request.version} "
            f"{request.from_env} → {request.to_env}"
        )
    differs = pr.same_source(checked, request.source)
    return f"approval {approval_id}: {differs}" if differs else ""


def carry_out(
    source: Place,
    target: Place,
    checked: pr.SourceVersion,
    actor: Actor,
    *,
    approval_id: str = "",
    now: dt.datetime | None = None,
) -> Outcome:
    """Copy the checked version into the target and start the target's evaluation of it.
    Refused, with nothing written, into an approval-required target unless `approval_id` is an
    approved request for exactly this version and these bytes."""
    now = _now(now)
    model, version = checked.model, checked.version.version
    if target.approval_required:
        problem = _approval_problem(target, approval_id, checked, source.env)
        if problem:
            return Outcome(
                REFUSED,
                f"{target.env} requires an approved request before {model} v{version} can be "
                f"promoted into it: {problem}",
                "not_approved",
            )
    done = pr.read_promotion(target.storage, model, version, source.env)
    if done is not None and done.state == pr.PUBLISHED:
        return _already(target, model, version, source.env, done)
    try:
        chosen = target_config(source, target, checked)
    except pr.Refusal as refusal:
        return _refused(refusal)
    # Read only: the target's own holdout, or why there is none.
    config, gates_from = chosen.config, chosen.gates_from
    own = target_holdout(target, checked, config)
    run_id = layout.promoted_run_id(source.env, source.project, model, version)
    started, _ = pr.start_promotion(
        target.storage,
        model,
        version,
        source.env,
        {
            "model": model,
            "version": version,
            "from_env": source.env,
            "to_env": target.env,
            "run_id": run_id,
            "source": checked.describe(),
            "approval_id": approval_id,
            "promoted_by": actor.name,
            "promoted_by_source": actor.source,
            "started_at": now.isoformat(),
        },
    )
    if started.state == pr.PUBLISHED:
        return _already(target, model, version, source.env, started)
    copies, copied_dataset = _copy_artifacts(target, checked, run_id)
    holdout = own if isinstance(own, Holdout) else _copied_holdout(checked, copied_dataset, own)
    paths = layout.RunPaths(run_id)
    put = target.storage
    # Written here rather than copied (no source object): the config with the target's gates,
    # the holdout's split and the lineage; read back and checked all the same.
    copies.append(pr.copy_verified(put, paths.config, config.canonical_json()))
    if chosen.registered is not None:
        copies.append(
            pr.copy_verified(put, paths.promoted_source(PIPELINE_CONFIG), chosen.registered)
        )
    copies.append(pr.copy_verified(put, paths.split, holdout.split))
    source_ref = _source_event(checked, approval_id, holdout.source)
    lineage = promoted_lineage(
        source,
        target,
        checked,
        run_id,
        config,
        holdout,
        gates_from,
        actor,
        approval_id,
        now,
        copies,
    )
    copies.append(pr.copy_verified(put, paths.lineage, _json(lineage)))
    trained = promoted_training(checked, run_id, config, holdout, target, source_ref)
    recorded = record_and_publish(
        target.storage, target.publisher, paths.training, trained, stage=PRODUCER
    )
    finished = pr.finish_promotion(
        target.storage,
        started,
        model,
        version,
        source.env,
        {
            "copies": [c.to_json() for c in copies],
            "holdout": {
                "source": holdout.source,
                "dataset": events.to_dict(holdout.dataset),
                "rows": holdout.rows,
                "note": holdout.note,
            },
            "gates_from": gates_from,
            "training_completed_uri": target.storage.uri(paths.training),
            "model_uri": recorded.model_uri,
        },
    )
    log.info("promoted %s v%d %s → %s as run %s", model, version, source.env, target.env, run_id)
    return Outcome(
        PROMOTED,
        f"{model} v{version} copied {source.env} → {target.env} as run {run_id} "
        f"({len(copies)} objects, each read back and checked); the holdout is "
        f"{_holdout_said(holdout)}; gates from {gates_from}; TrainingCompleted published in "
        f"{target.project}: {target.env}'s evaluator and deployer take it from there",
        promotion=finished.record,
        run_id=run_id,
    )


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode()


def _mapping(data: bytes) -> dict[str, Any]:
    loaded = json.loads(data)
    return loaded if isinstance(loaded, dict) else {}


def _holdout_said(holdout: Holdout) -> str:
    if holdout.source == "target_dataset":
        return f"the target's own dataset {holdout.dataset.uri} ({holdout.rows} rows)"
    return f"the source run's, copied ({holdout.rows} rows: {holdout.note})"


def _copy_artifacts(
    target: Place, checked: pr.SourceVersion, run_id: str
) -> tuple[list[pr.Copy], pr.Copy]:
    """The version's artifacts and its run's records, copied into the target run; (every copy,
    the dataset's copy)."""
    paths = layout.RunPaths(run_id)
    put = target.storage
    mv = checked.version
    copies = [pr.copy_verified(put, paths.model, checked.model_bytes, mv.model_uri)]
    for name, data in checked.extras.items():
        found = mv.artifact(name)
        copies.append(pr.copy_verified(put, paths.file(name), data, found[0] if found else ""))
    trained = checked.trained
    src = layout.RunPaths(checked.run_id)
    records = [
        ("split.json", checked.split, trained.split_uri),
        ("lineage.json", checked.lineage, trained.lineage_uri),
        ("config.json", checked.config, checked.storage.uri(src.config)),
        *(
            (name, data, checked.storage.uri(src.file(name)))
            for name, data in checked.records.items()
        ),
    ]
    for name, data, uri in records:
        copies.append(pr.copy_verified(put, paths.promoted_source(name), data, uri))
    suffix = (
        PurePosixPath(trained.dataset.uri).suffix
        or f".{events.data_format(trained.dataset) or 'csv'}"
    )
    dataset = pr.copy_verified(
        put, paths.promoted_source(f"dataset{suffix}"), checked.dataset, trained.dataset.uri
    )
    copies.append(dataset)
    return copies, dataset


def _copied_holdout(checked: pr.SourceVersion, copied: pr.Copy, note: str) -> Holdout:
    ref = events_pb2.DatasetRef()
    ref.CopyFrom(checked.trained.dataset)
    ref.uri = copied.uri
    ref.generation = copied.generation
    split = _mapping(checked.split)
    return Holdout(ref, checked.split, "copied", note, len(split.get("holdout", [])))


@dataclass(frozen=True)
class TargetConfig:
    """The promoted run's config: the source run's, with the gates the target applies."""

    config: PipelineConfig
    gates_from: str  # where the gates come from, for the records
    # The registered pipeline config the gates were read from (kept with the promoted run, so
    # that its next promotion finds the next environment's overrides even where no
    # environment on the way has the pipeline registered); None: the run's own gates.
    registered: bytes | None = None


def target_config(source: Place, target: Place, checked: pr.SourceVersion) -> TargetConfig:
    """The run's config with the target's gates: those of the pipeline's registered config
    with its `environments.<target>` overrides, the target's (`pipelines/<name>/config.yaml`),
    else the source's, else the one the source run was itself promoted with; else the run's own
    gates."""
    uri = checked.storage.uri(layout.RunPaths(checked.run_id).config)
    try:
        run_config = parse_config(checked.config, source=uri)
    except ConfigError as exc:
        raise pr.Refusal("invalid_config", str(exc)) from None
    candidates = (
        (target.storage, config_path(run_config.name)),
        (source.storage, config_path(run_config.name)),
        (source.storage, layout.RunPaths(checked.run_id).promoted_source(PIPELINE_CONFIG)),
    )
    for storage, path in candidates:
        found = storage.read(path)
        if found is None:
            continue
        try:
            registered = parse_config(found.data, source=found.uri, env=target.env)
        except ConfigError as exc:
            raise pr.Refusal("invalid_config", f"the gates for {target.env}: {exc}") from None
        if registered.model.task != run_config.model.task:
            raise pr.Refusal(
                "invalid_config",
                f"{found.uri} is a {registered.model.task} pipeline; the run is "
                f"{run_config.model.task}: its gates cannot judge it",
            )
        return TargetConfig(
            run_config.model_copy(update={"gates": registered.gates}),
            f"{found.uri} (env {target.env})",
            found.data,
        )
    return TargetConfig(run_config, f"the source run's own config ({uri})")


def latest_dataset(storage: Storage, name: str) -> tuple[str, int] | None:
    """The newest landed object of dataset `name` (by its dt= day, then creation): (path,
    generation), or None."""
    newest: tuple[str, float, str, int] | None = None
    for blob in storage.client.list_blobs(storage.bucket_name, prefix=layout.dataset_prefix(name)):
        match = layout.DATASET_PATH.match(blob.name)
        if match is None or match["name"] != name:
            continue
        created = blob.time_created.timestamp() if blob.time_created else 0.0
        key = (match["date"], created, blob.name, int(blob.generation or 0))
        if newest is None or key[:2] > newest[:2]:
            newest = key
    return None if newest is None else (newest[2], newest[3])


def target_holdout(
    target: Place, checked: pr.SourceVersion, config: PipelineConfig
) -> Holdout | str:
    """The target's own holdout: its newest dataset of the run's name, split as the run's
    config says (the rows its own champion was not trained on, when it was trained there on that
    data with that config), if the model can be scored on it; otherwise why not."""
    # Imported here: they bring pandas and scikit-learn, which every `mlpipe` command would
    # otherwise import at its start (the CLI imports this module for `mlpipe promote`).
    from mlpipe.ml.data import read_dataset
    from mlpipe.ml.split import split_rows
    from mlpipe.ml.validation import check_dataset

    name = checked.trained.dataset.name or config.name
    found = latest_dataset(target.storage, name)
    if found is None:
        return f"{target.env} has no dataset {name!r} of its own"
    path, generation = found
    uri = target.storage.uri(path)
    obj = target.storage.read(path, generation=generation)
    if obj is None:
        return f"{uri} vanished while it was read"
    fmt = "parquet" if path.endswith(".parquet") else "csv"
    features = [str(f) for f in _mapping(checked.lineage).get("features") or []]
    try:
        frame = read_dataset(obj.data, fmt, uri)
        check_dataset(frame, config, uri)
        missing = [f for f in features if f not in frame.columns]
        if missing:
            raise PermanentError("missing_column", f"{uri} lacks the model's features {missing}")
        split = split_rows(frame, config)
    except PermanentError as exc:
        return f"{uri} cannot be the holdout: {exc.message}"
    ref = events_pb2.DatasetRef(
        uri=uri,
        generation=obj.generation,
        sha256=sha256_hex(obj.data),
        name=name,
        row_count=len(frame),
        data_format=events.DATA_FORMAT.of(fmt),
    )
    note = f"{len(split.holdout)} of its {len(frame)} rows, split as the run's config says"
    return Holdout(ref, _json(split.to_json()), "target_dataset", note, len(split.holdout))


def _context(previous: events_pb2.RunContext) -> events_pb2.RunContext:
    """The source run's context, produced by the promotion: the code version stays the one
    that trained the model; the trace is the promotion's own (none outside a span)."""
    ctx = events.next_context(previous, producer=PRODUCER, code_version=previous.code_version)
    ctx.trace_id = tracing.trace_id()
    return ctx


def _source_event(
    checked: pr.SourceVersion, approval_id: str = "", holdout: str = ""
) -> events_pb2.PromotionSource:
    mv = checked.version
    return events_pb2.PromotionSource(
        env=checked.env,
        project=checked.project,
        bucket=checked.storage.bucket_name,
        model_name=mv.model,
        version=mv.version,
        run_id=mv.run_id,
        model_uri=mv.model_uri,
        model_sha256=mv.model_sha256,
        lineage_uri=checked.trained.lineage_uri,
        approval_id=approval_id,
        holdout=events.HOLDOUT_SOURCE.of(holdout)
        if holdout
        else events_pb2.HOLDOUT_SOURCE_UNSPECIFIED,
    )


def promoted_training(
    checked: pr.SourceVersion,
    run_id: str,
    config: PipelineConfig,
    holdout: Holdout,
    target: Place,
    source_ref: events_pb2.PromotionSource,
) -> events_pb2.TrainingCompleted:
    """The TrainingCompleted that starts the target's evaluation: the source run's, pointing at
    the copies in the target and at the holdout chosen there, under the promoted run's id."""
    paths = layout.RunPaths(run_id)
    trained = events_pb2.TrainingCompleted()
    trained.CopyFrom(checked.trained)
    trained.context.CopyFrom(_context(checked.trained.context))
    trained.context.run_id = run_id
    trained.context.config_sha256 = config.sha256()
    trained.dataset.CopyFrom(holdout.dataset)
    trained.model_uri = target.storage.uri(paths.model)
    trained.split_uri = target.storage.uri(paths.split)
    trained.lineage_uri = target.storage.uri(paths.lineage)
    trained.holdout_rows = holdout.rows
    trained.promoted_from.CopyFrom(source_ref)
    return trained


def promoted_lineage(
    source: Place,
    target: Place,
    checked: pr.SourceVersion,
    run_id: str,
    config: PipelineConfig,
    holdout: Holdout,
    gates_from: str,
    actor: Actor,
    approval_id: str,
    now: dt.datetime,
    copies: list[pr.Copy],
) -> dict[str, Any]:
    """The promoted run's lineage.json: what the trainer writes (the model, its features and
    target, the code and request that made it), with the holdout used here, and
    `promoted_from`: where it came from, with the source run's lineage inline (so the bytes and
    the commit that made the model are found without the source bucket)."""
    paths = layout.RunPaths(run_id)
    was = _mapping(checked.lineage)
    split = _mapping(holdout.split)
    copied = {c.source_uri: c.uri for c in copies if c.source_uri}
    mv = checked.version
    return {
        **{
            k: was[k]
            for k in ("features", "target", "code_version", "request_id", "trained_at")
            if k in was
        },
        "run_id": run_id,
        "dataset": events.to_dict(holdout.dataset) | {"rows": holdout.dataset.row_count},
        "config_sha256": config.sha256(),
        "config_uri": target.storage.uri(paths.config),
        "model": {
            **(was.get("model") or {}),
            "uri": target.storage.uri(paths.model),
            "sha256": mv.model_sha256,
        },
        "split": {
            "uri": target.storage.uri(paths.split),
            "seed": split.get("seed"),
            "stratified": split.get("stratified"),
            "strategy": split.get("strategy"),
            "cutoff": split.get("cutoff"),
            "train_rows": len(split.get("train", [])),
            "holdout_rows": holdout.rows,
            "holdout": holdout.source,
            "note": holdout.note,
        },
        "gates_from": gates_from,
        "promoted_at": now.isoformat(),
        "promoted_by": actor.name,
        "promoted_by_source": actor.source,
        "promoted_from": {
            "env": source.env,
            "project": source.project,
            "bucket": source.bucket,
            "model": mv.model,
            "version": mv.version,
            "run_id": mv.run_id,
            "model_uri": mv.model_uri,
            "model_sha256": mv.model_sha256,
            "artifacts": checked.artifacts(),
            "config_sha256": checked.trained.context.config_sha256,
            "dataset": events.to_dict(checked.trained.dataset),
            "dataset_copy_uri": copied.get(checked.trained.dataset.uri, ""),
            "lineage_uri": checked.trained.lineage_uri,
            "lineage_copy_uri": copied.get(checked.trained.lineage_uri, ""),
            "lineage": was,
            "evaluation": {
                "passed": checked.evaluation.passed,
                "metrics": dict(checked.evaluation.metrics),
                "metrics_uri": checked.evaluation.metrics_uri,
            },
            "approval_id": approval_id,
            "to_env": target.env,
        },
    }


def lineage_chain(storage: Storage, run_id: str, limit: int = 10) -> list[dict[str, Any]]:
    """A run's lineage, then the lineage of each run it was promoted from, read from the
    copies kept in this bucket (each promotion inlines its source's)."""
    chain: list[dict[str, Any]] = []
    current = storage.read_json(layout.RunPaths(run_id).lineage)
    while isinstance(current, dict) and len(chain) < limit:
        chain.append(current)
        current = (current.get("promoted_from") or {}).get("lineage")
    return chain
