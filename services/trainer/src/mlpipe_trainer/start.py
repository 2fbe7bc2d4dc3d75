"""The trainer's step: a dataset landed → claim its run → start a training job → return.

Training never runs inside the push request (its deadline is at most 600 s): the job is
started and the handler returns at once. The job publishes TrainingCompleted itself.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Protocol

from mlpipe.errors import Held, PermanentError, TransientError
from mlpipe.faults import fault_point
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import (
    EnvelopeError,
    ObjectNotification,
    PushMessage,
    parse_object_notification,
)
from mlpipe.ml.config import PipelineConfig, load_pipeline_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.validation import check_dataset
from mlpipe.runtime.failures import FailureReporter
from mlpipe.runtime.steps import StepResult, decode_message
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
        return start_training(message, self)


def _requested_at(metadata: dict[str, str], default: dt.datetime) -> dt.datetime:
    """The ingest request's time from the object's metadata; the upload time otherwise."""
    try:
        return dt.datetime.fromisoformat(metadata["requested_at"])
    except (KeyError, ValueError):
        return default


def _relanded(message: PushMessage) -> ObjectNotification | None:
    """A DatasetLanded for content that was already there, as the notification GCS would
    have sent for it; None for any other DatasetLanded.

    Ingest names objects by content, so identical bytes land once and GCS notifies once. When
    they are ingested again under a changed config, this is what starts the new run.
    """
    landed = decode_message(events_pb2.DatasetLanded, message)
    if not landed.already_present:
        return None  # the object's own notification starts that run
    bucket, name = parse_gs_uri(landed.dataset.uri)
    metadata = {
        "sha256": landed.dataset.sha256,
        "row_count": str(landed.dataset.row_count),
        "request_id": landed.context.request_id,
    }
    if landed.context.HasField("requested_at"):
        metadata["requested_at"] = landed.context.requested_at.ToDatetime(dt.UTC).isoformat()
    return ObjectNotification(
        bucket=bucket,
        name=name,
        generation=landed.dataset.generation,
        event_type="OBJECT_FINALIZE",
        metadata=metadata,
        size=0,
        content_type="",
        time_created=landed.dataset.landed_at.ToDatetime(dt.UTC)
        if landed.dataset.HasField("landed_at")
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


def start_training(message: PushMessage, deps: TrainingStarter) -> StepResult:
    if (
        message.attributes.get(events.EVENT_TYPE_ATTR)
        == events_pb2.DatasetLanded.DESCRIPTOR.full_name
    ):
        relanded = _relanded(message)
        if relanded is None:
            return StepResult("ignored", {"detail": "new objects start runs by notification"})
        note = relanded
    else:
        try:
            note = parse_object_notification(message)
        except EnvelopeError as exc:
            raise PermanentError("invalid_notification", str(exc)) from exc
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
    config = load_pipeline_config(deps.storage, name, deps.env)
    memory = deps.memory if config.training.backend == "local" else None
    size = None
    if memory is not None:
        # GCS's notification says; a relanded dataset's event does not: ask for its metadata.
        size = note.size or object_size(deps.storage, note.name, note.generation)
    sha = note.metadata.get("sha256", "")
    uploaded: bytes | None = None
    if not sha:
        if memory is not None:
            # Hashing and checking an upload holds all of it in this server's memory.
            _refuse_if_too_large(
                memory,
                note,
                fmt,
                size,
                events_pb2.DatasetRef(
                    uri=note.uri,
                    generation=note.generation,
                    name=name,
                    data_format=events.DATA_FORMAT.of(fmt),
                ),
            )
        # A direct upload: GCS offers only md5/crc32c, so hash the exact generation.
        obj = deps.storage.read(note.name, generation=note.generation)
        if obj is None:
            return StepResult("ignored", {"object": note.uri, "detail": "object is gone"})
        sha = sha256_hex(obj.data)
        uploaded = obj.data
    config_sha = config.sha256()
    run_id = layout.run_id_for(sha, config_sha)
    ctx = events.context(
        producer="trainer",
        code_version=deps.code_version,
        run_id=run_id,
        pipeline=name,
        config_sha256=config_sha,
        request_id=note.metadata.get("request_id", ""),
    )
    dataset = events_pb2.DatasetRef(
        uri=note.uri,
        generation=note.generation,
        sha256=sha,
        name=name,
        data_format=events.DATA_FORMAT.of(fmt),
        row_count=int(note.metadata.get("row_count") or 0),
    )
    landed_at = note.time_created or dt.datetime.now(dt.UTC)
    dataset.landed_at.CopyFrom(events.timestamp(landed_at))
    ctx.requested_at.CopyFrom(events.timestamp(_requested_at(note.metadata, landed_at)))
    paths = layout.RunPaths(run_id)

    recorded = deps.storage.read(paths.training)
    if recorded is not None:
        current = lease.read(deps.storage, paths.claim)
        if (
            current is not None
            and current.state == lease.PUBLISHED
            and current.body.get("message_id") == message.message_id
        ):
            # The delivery held while its own job ran: the job published; just acknowledge.
            return StepResult("trained", {"detail": "run recorded by its job"}, run_id=run_id)
        deps.publisher.publish(events.from_json(events_pb2.TrainingCompleted, recorded.data))
        return StepResult(
            "duplicate", {"detail": "run already trained; event re-published"}, run_id=run_id
        )
    if deps.storage.exists(paths.failed):
        return StepResult("duplicate", {"detail": "run already failed"}, run_id=run_id)
    if uploaded is not None:
        # Ingest checked what it landed; a direct upload is checked here, before any job.
        problem = check_upload(uploaded, fmt, note.uri, config)
        if problem is not None:
            failed = reject_upload(deps, note, uploaded, problem, ctx, dataset)
            return StepResult(
                "rejected",
                {"reason": failed.reason, "quarantine_uri": failed.quarantine_uri},
                run_id=run_id,
            )

    launcher = deps.launchers.get(config.training.backend)
    if launcher is None:
        raise PermanentError(
            "backend_unavailable",
            f"pipeline {name!r} asks for training backend {config.training.backend!r}; this "
            f"trainer offers {sorted(deps.launchers)} (vertex needs MLPIPE_TRAINER_IMAGE)",
            context=ctx,
            dataset=dataset,
        )
    if memory is not None:
        _refuse_if_too_large(memory, note, fmt, size, dataset, ctx)
    # Until its job renews it, a claim lives as long as the backend may take to start one.
    start_lease = float(getattr(launcher, "start_lease_seconds", 0) or deps.lease_seconds)
    body = {
        "run_id": run_id,
        "dataset": note.uri,
        "generation": note.generation,
        "message_id": message.message_id,
        "lease_seconds": start_lease,
        "claimed_at_iso": dt.datetime.now(dt.UTC).isoformat(),
    }
    claim, held = lease.take(deps.storage, paths.claim, body, deps.lease_seconds)
    if claim is None:
        if held is not None and held.body.get("message_id") == message.message_id:
            # This delivery started the job: keep it unacknowledged until the run is
            # recorded, so that a job lost with its instance is started again.
            raise Held(
                f"run {run_id} is training ({held.state}, job {held.body.get('job_id', '-')}); "
                f"this notification is acknowledged once the run is recorded"
            )
        return StepResult(
            "in_progress",
            {"detail": "another delivery holds this run's claim"},
            run_id=run_id,
        )
    if claim.crashes >= deps.max_crashes:
        failed = fail_crashed(deps, ctx, dataset, claim)
        return StepResult("failed", {"reason": failed.reason}, run_id=run_id)
    fault_point("trainer.after_claim")

    deps.storage.write(paths.config, config.canonical_json(), content_type="application/json")
    started = events_pb2.TrainingStarted(
        context=ctx,
        dataset=dataset,
        training_backend=events.TRAINING_BACKEND.of(launcher.backend),
    )
    if memory is not None and size is not None:
        # Reserved until the job exits (the launcher releases it); beside the jobs running
        # now it may not fit: the redelivery tries again.
        waiting = memory.reserve(run_id, size, fmt)
        if waiting is not None:
            lease.release(deps.storage, paths.claim, crashed=False)
            raise TransientError(waiting)
    try:
        started.job_id = launcher.launch(started, config)
    except Exception:
        # Release the claim so the redelivery can start the job again.
        if memory is not None:
            memory.release(run_id)
        lease.release(deps.storage, paths.claim, crashed=False)
        raise
    fault_point("trainer.after_launch")
    deps.storage.write(
        paths.started, events.to_json(started).encode(), content_type="application/json"
    )
    deps.publisher.publish(started)
    log.info(
        "started %s training job %s for %s (attempt %d)",
        launcher.backend,
        started.job_id,
        note.uri,
        claim.attempt,
        extra={"run_id": run_id},
    )
    raise Held(
        f"started training job {started.job_id} for run {run_id} (attempt {claim.attempt}); "
        f"this notification is acknowledged once the run is recorded"
    )


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
