"""The trainer's step: a dataset landed → claim its run → start a training job → return.

Training never runs inside the push request (its deadline is at most 600 s): the job is
started and the delivery acknowledged at once. The job publishes TrainingCompleted itself.
Nothing is lost when a job dies: its claim is a lease (mlpipe_trainer.lease), and `reconcile`
(on a timer here, from Cloud Scheduler in the cloud) starts again every started run whose
lease lapsed without a result. Holding the delivery with 503 for the length of a job instead
would make Pub/Sub slow the whole subscription, so new datasets would wait behind it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from mlpipe.errors import PermanentError
from mlpipe.faults import fault_point
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import (
    EnvelopeError,
    ObjectNotification,
    PushMessage,
    parse_object_notification,
)
from mlpipe.ml.config import PipelineConfig, load_pipeline_config, load_run_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.validation import check_dataset
from mlpipe.runtime.failures import FailureReporter
from mlpipe.runtime.steps import (
    Recorded,
    Router,
    StepResult,
    permanent,
    run_step,
    transient,
)
from mlpipe.store import layout
from mlpipe.store.storage import Storage, parse_gs_uri, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_trainer import lease
from mlpipe_trainer.memory import MemoryBudget, object_size

log = logging.getLogger(__name__)


class JobLauncher(Protocol):
    backend: str

    def launch(self, started: events_pb2.TrainingStarted, config: PipelineConfig) -> str:
        """Start the training job for `started`; return a job id."""
        ...


@dataclass
class TrainingStarter:
    storage: Storage
    publisher: Publisher
    launchers: dict[str, JobLauncher]
    code_version: str
    lease_seconds: float
    env: str = "local"
    # A run whose job died this many times without a result fails with job_crashed.
    max_crashes: int = 3
    # The memory local jobs share with the trainer; None: not checked.
    memory: MemoryBudget | None = None

    def __call__(self, message: PushMessage) -> StepResult:
        return Router(
            {
                events.GCS_OBJECT_NOTIFICATION: lambda m, _: on_notification(m, self),
                events_pb2.DatasetLanded.DESCRIPTOR.full_name: lambda e, m: on_landed(e, m, self),
            },
            default=events.GCS_OBJECT_NOTIFICATION,
        )(message)

    def reconcile(self) -> list[StepResult]:
        return reconcile(self)


def _requested_at(metadata: dict[str, str], default: dt.datetime) -> dt.datetime:
    """The ingest request's time from the object's metadata; the upload time otherwise."""
    try:
        return dt.datetime.fromisoformat(metadata["requested_at"])
    except (KeyError, ValueError):
        return default


def _relanded(landed: events_pb2.DatasetLanded) -> ObjectNotification | None:
    """A DatasetLanded for content that was already there, as the notification GCS would
    have sent for it; None for any other DatasetLanded.

    Ingest names objects by content, so identical bytes land once and GCS notifies once. When
    they are ingested again under a changed config, this is what starts the new run.
    """
    if not landed.already_present:
        return None  # the object's own notification starts that run
    return notification_of(landed.context, landed.dataset)


def notification_of(
    ctx: events_pb2.RunContext, dataset: events_pb2.DatasetRef
) -> ObjectNotification:
    """The notification GCS sent (or would have sent) for an event's dataset."""
    bucket, name = parse_gs_uri(dataset.uri)
    metadata = {
        "sha256": dataset.sha256,
        "row_count": str(dataset.row_count),
        "request_id": ctx.request_id,
    }
    if ctx.HasField("requested_at"):
        metadata["requested_at"] = ctx.requested_at.ToDatetime(dt.UTC).isoformat()
    return ObjectNotification(
        bucket=bucket,
        name=name,
        generation=dataset.generation,
        event_type="OBJECT_FINALIZE",
        metadata=metadata,
        size=0,
        content_type="",
        time_created=dataset.landed_at.ToDatetime(dt.UTC)
        if dataset.HasField("landed_at")
        else None,
    )


def check_upload(data: bytes, fmt: str, uri: str, config: PipelineConfig) -> PermanentError | None:
    """The first problem of an uploaded dataset for `config`, or None when it can train."""
    try:
        check_dataset(read_dataset(data, fmt, uri), config, uri)
    except PermanentError as exc:
        return exc
    return None


def reject_upload(
    deps: TrainingStarter,
    note: ObjectNotification,
    data: bytes,
    problem: PermanentError,
    ctx: events_pb2.RunContext,
    dataset: events_pb2.DatasetRef,
) -> events_pb2.PipelineFailed:
    """Copy the upload to `quarantine/<reason>/`, publish PipelineFailed, mark the run failed.

    The copy keeps the bad bytes even when the user replaces or deletes the upload; the run's
    failed marker makes a redelivered notification a duplicate.
    """
    failures = FailureReporter(
        deps.storage, deps.publisher, stage="trainer", code_version=deps.code_version
    )
    object_id = f"{note.name}#{note.generation}"
    quarantine_uri = failures.quarantine(
        problem.reason,
        data,
        key=object_id.replace("/", "_"),
        metadata={"message": problem.message[:1000], "object": note.uri},
    )
    failed = failures.report(
        reason=problem.reason,
        message=f"{problem.message} (uploaded file, generation {note.generation})",
        context=ctx,
        dataset=dataset,
        quarantine_uri=quarantine_uri,
    )
    deps.storage.write(
        layout.RunPaths(ctx.run_id).failed,
        events.to_json(failed).encode(),
        content_type="application/json",
    )
    return failed


def _refuse_if_too_large(
    memory: MemoryBudget,
    note: ObjectNotification,
    fmt: str,
    size: int | None,
    dataset: events_pb2.DatasetRef,
    ctx: events_pb2.RunContext | None = None,
) -> None:
    """Raise `dataset_too_large` when a local job could never train this dataset here."""
    problem = None if size is None else memory.too_large(note.uri, size, fmt)
    if problem is not None:
        raise PermanentError("dataset_too_large", problem, context=ctx, dataset=dataset)


@dataclass
class RunPlan:
    """What a notification asks for: the run it keys (dataset sha256 x config) and its inputs."""

    note: ObjectNotification
    fmt: str
    config: PipelineConfig
    ctx: events_pb2.RunContext
    dataset: events_pb2.DatasetRef
    # The local jobs' memory budget and the object's size, when a local job will train it.
    memory: MemoryBudget | None
    size: int | None
    # A direct upload's bytes, read to hash them: checked before any job starts.
    uploaded: bytes | None

    @property
    def run_id(self) -> str:
        return self.ctx.run_id

    @property
    def paths(self) -> layout.RunPaths:
        return layout.RunPaths(self.ctx.run_id)


def plan_run(
    note: ObjectNotification, deps: TrainingStarter, config: PipelineConfig | None = None
) -> RunPlan | StepResult:
    """The run a dataset object starts under its pipeline's config (or `config`, the one a
    run recorded); a StepResult when the object starts nothing."""
    if note.event_type != "OBJECT_FINALIZE" or note.bucket != deps.storage.bucket_name:
        return StepResult("ignored", {"object": note.uri, "event": note.event_type})
    match = layout.DATASET_PATH.match(note.name)
    if match is None:
        if note.name.startswith(layout.DATASETS):
            raise PermanentError(
                "bad_dataset_path",
                f"{note.uri} is not a dataset path: expected {layout.DATASET_PATH_FORM}",
            )
        return StepResult("ignored", {"object": note.uri})
    name, fmt = match["name"], match["ext"]
    config = config or load_pipeline_config(deps.storage, name, deps.env)
    memory = deps.memory if config.training.backend == "local" else None
    # GCS's notification says; a relanded dataset's event does not: ask for its metadata.
    size = (note.size or object_size(deps.storage, note.name, note.generation)) if memory else None
    dataset = events_pb2.DatasetRef(
        uri=note.uri,
        generation=note.generation,
        sha256=note.metadata.get("sha256", ""),
        name=name,
        data_format=events.DATA_FORMAT.of(fmt),
        row_count=int(note.metadata.get("row_count") or 0),
    )
    uploaded: bytes | None = None
    if not dataset.sha256:
        if memory is not None:
            # Hashing and checking an upload holds all of it in this server's memory.
            _refuse_if_too_large(memory, note, fmt, size, dataset)
        # A direct upload: GCS offers only md5/crc32c, so hash the exact generation.
        obj = deps.storage.read(note.name, generation=note.generation)
        if obj is None:
            return StepResult("ignored", {"object": note.uri, "detail": "object is gone"})
        dataset.sha256, uploaded = sha256_hex(obj.data), obj.data
    ctx = events.context(
        producer="trainer",
        code_version=deps.code_version,
        run_id=layout.run_id_for(dataset.sha256, config.sha256()),
        pipeline=name,
        config_sha256=config.sha256(),
        request_id=note.metadata.get("request_id", ""),
    )
    landed_at = note.time_created or dt.datetime.now(dt.UTC)
    dataset.landed_at.CopyFrom(events.timestamp(landed_at))
    ctx.requested_at.CopyFrom(events.timestamp(_requested_at(note.metadata, landed_at)))
    return RunPlan(note, fmt, config, ctx, dataset, memory, size, uploaded)


def admit(
    plan: RunPlan, message_id: str, deps: TrainingStarter, claimed: list[lease.Claim]
) -> StepResult | None:
    """Check what can be checked before a job starts, then claim the run (into `claimed`);
    None when this delivery starts the job, or the answer to give instead."""
    run_id, paths = plan.run_id, plan.paths
    if deps.storage.exists(paths.failed):
        return StepResult("duplicate", {"detail": "run already failed"}, run_id=run_id)
    if plan.uploaded is not None:
        # Ingest checked what it landed; a direct upload is checked here, before any job.
        problem = check_upload(plan.uploaded, plan.fmt, plan.note.uri, plan.config)
        if problem is not None:
            failed = reject_upload(deps, plan.note, plan.uploaded, problem, plan.ctx, plan.dataset)
            return StepResult(
                "rejected",
                {"reason": failed.reason, "quarantine_uri": failed.quarantine_uri},
                run_id=run_id,
            )
    launcher = _launcher(plan, deps)
    if plan.memory is not None:
        _refuse_if_too_large(plan.memory, plan.note, plan.fmt, plan.size, plan.dataset, plan.ctx)
    # From here the reconciler watches the run: the marker, written before the claim, holds
    # what starts the run again, so no instance can die holding a claim nobody watches.
    deps.storage.write(paths.config, plan.config.canonical_json(), content_type="application/json")
    opened = events_pb2.TrainingStarted(context=plan.ctx, dataset=plan.dataset)
    deps.storage.write(
        layout.open_run_path(run_id),
        events.to_json(opened).encode(),
        content_type="application/json",
    )
    # Until its job renews it, a claim lives as long as the backend may take to start one.
    start_lease = float(getattr(launcher, "start_lease_seconds", 0) or deps.lease_seconds)
    body = {
        "run_id": run_id,
        "dataset": plan.note.uri,
        "generation": plan.note.generation,
        "message_id": message_id,
        "lease_seconds": start_lease,
        "claimed_at_iso": dt.datetime.now(dt.UTC).isoformat(),
    }
    claim, _ = lease.take(deps.storage, paths.claim, body, deps.lease_seconds)
    if claim is None:
        # A job, or a delivery starting one, owns the run: its lease, and the reconciler once
        # the lease lapses, see that the run ends recorded.
        return StepResult("in_progress", {"detail": "the run's claim is held"}, run_id=run_id)
    if claim.crashes >= deps.max_crashes:
        failed = fail_crashed(deps, plan.ctx, plan.dataset, claim)
        deps.storage.delete(layout.open_run_path(run_id))
        return StepResult("failed", {"reason": failed.reason}, run_id=run_id)
    fault_point("trainer.after_claim")
    claimed.append(claim)
    return None


def _launcher(plan: RunPlan, deps: TrainingStarter) -> JobLauncher:
    launcher = deps.launchers.get(plan.config.training.backend)
    if launcher is None:
        raise PermanentError(
            "backend_unavailable",
            f"pipeline {plan.config.name!r} asks for training backend "
            f"{plan.config.training.backend!r}; this trainer offers {sorted(deps.launchers)} "
            f"(vertex needs MLPIPE_TRAINER_IMAGE)",
            context=plan.ctx,
            dataset=plan.dataset,
        )
    return launcher


def launch(
    plan: RunPlan, claim: lease.Claim, deps: TrainingStarter
) -> events_pb2.TrainingStarted | StepResult:
    """Start the run's job: the pure step of a training start."""
    run_id, paths, launcher = plan.run_id, plan.paths, _launcher(plan, deps)
    started = events_pb2.TrainingStarted(
        context=plan.ctx,
        dataset=plan.dataset,
        training_backend=events.TRAINING_BACKEND.of(launcher.backend),
    )
    if plan.memory is not None and plan.size is not None:
        # Reserved until the job exits (the launcher releases it); beside the jobs running
        # now it may not fit: the redelivery tries again.
        waiting = plan.memory.reserve(run_id, plan.size, plan.fmt)
        if waiting is not None:
            lease.release(deps.storage, paths.claim, crashed=False)
            return transient(waiting, run_id)
    try:
        started.job_id = launcher.launch(started, plan.config)
    except Exception:
        # Release the claim so the redelivery can start the job again.
        if plan.memory is not None:
            plan.memory.release(run_id)
        lease.release(deps.storage, paths.claim, crashed=False)
        raise
    fault_point("trainer.after_launch")
    log.info(
        "started %s training job %s for %s (attempt %d)",
        launcher.backend,
        started.job_id,
        plan.note.uri,
        claim.attempt,
        extra={"run_id": run_id},
    )
    return started


def start(
    note: ObjectNotification,
    message_id: str,
    deps: TrainingStarter,
    config: PipelineConfig | None = None,
) -> StepResult:
    """A dataset object → its run's training job, through the step protocol. The delivery is
    acknowledged once the run is recorded (the open-run marker, the claim, TrainingStarted):
    the lease and `reconcile` see it through from there."""
    try:
        plan = plan_run(note, deps, config)
    except PermanentError as exc:
        return permanent(exc)
    if isinstance(plan, StepResult):
        return plan
    claimed: list[lease.Claim] = []
    return run_step(
        storage=deps.storage,
        publisher=deps.publisher,
        stage="trainer",
        run_id=plan.run_id,
        skip=Recorded(plan.paths.training, events_pb2.TrainingCompleted),
        record_at=plan.paths.started,
        claim=lambda: admit(plan, message_id, deps, claimed),
        work=lambda: launch(plan, claimed[0], deps),
        done=lambda started: StepResult(
            "training",
            {"job_id": started.job_id, "backend": events.training_backend(started)},
            plan.run_id,
        ),
    )


def on_notification(message: PushMessage, deps: TrainingStarter) -> StepResult:
    try:
        note = parse_object_notification(message)
    except EnvelopeError as exc:
        return permanent(PermanentError("invalid_notification", str(exc)))
    return start(note, message.message_id, deps)


def on_landed(
    landed: events_pb2.DatasetLanded, message: PushMessage, deps: TrainingStarter
) -> StepResult:
    note = _relanded(landed)
    if note is None:
        return StepResult("ignored", {"detail": "new objects start runs by notification"})
    return start(note, message.message_id, deps)


def reconcile(deps: TrainingStarter) -> list[StepResult]:
    """Restart every started run whose job is gone: its claim was released or its lease
    lapsed, and no result is recorded. Cloud Scheduler calls it through the trainer's
    `POST /v1/runs:reconcile`; a local trainer runs it on a timer too. Idempotent."""
    results = []
    for marker in deps.storage.list(layout.OPEN_RUNS):
        run_id = marker.removeprefix(layout.OPEN_RUNS)
        paths = layout.RunPaths(run_id)
        if deps.storage.exists(paths.training) or deps.storage.exists(paths.failed):
            deps.storage.delete(marker)  # recorded: nothing left to watch
            continue
        claim = lease.read(deps.storage, paths.claim)
        opened = deps.storage.read(marker)
        if opened is None or (claim is not None and not claim.expired(deps.lease_seconds)):
            continue
        started = events.from_json(events_pb2.TrainingStarted, opened.data)
        config = load_run_config(deps.storage, run_id)
        attempt = claim.attempt if claim is not None else 0
        log.warning("run %s: its job is gone; starting it again", run_id, extra={"run_id": run_id})
        results.append(
            start(
                notification_of(started.context, started.dataset),
                f"reconcile-{attempt}",
                deps,
                config,
            )
        )
    return results


class Reconciler:
    """Runs `reconcile` every `interval` seconds in a background thread (0: never)."""

    def __init__(self, starter: TrainingStarter, interval: float) -> None:
        self.starter = starter
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.starter.reconcile()
            except Exception:  # a pass that fails is tried again at the next tick
                log.exception("reconcile pass failed")


def fail_crashed(
    deps: TrainingStarter,
    ctx: events_pb2.RunContext,
    dataset: events_pb2.DatasetRef,
    claim: lease.Claim,
) -> events_pb2.PipelineFailed:
    """The run's job died `crashes` times without a result: fail the run for good."""
    failures = FailureReporter(
        deps.storage, deps.publisher, stage="trainer", code_version=deps.code_version
    )
    failed = failures.report(
        reason="job_crashed",
        message=f"the training job of run {ctx.run_id} died {claim.crashes} times without "
        f"recording a result (last job {claim.body.get('previous', {}).get('job_id', '-')}); "
        f"see its log; fix the cause, then `mlpipe failures replay` the notification",
        context=ctx,
        dataset=dataset,
    )
    paths = layout.RunPaths(ctx.run_id)
    deps.storage.write(
        paths.failed, events.to_json(failed).encode(), content_type="application/json"
    )
    return failed
