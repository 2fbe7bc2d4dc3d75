"""Sources that are a cloud export (Earth Engine, BigQuery): started by a push, finished by a check.

A push of an IngestRequest whose source is an export never waits for it. The export's id is
derived from the request (`layout.export_id_for`), so every delivery of one request finds the
same record, `ingest/exports/<export_id>.json`:
- no record: the backend starts the export idempotently (the cloud service's own request or
  job id, derived from the export id), the record is created if absent, and the push is
  acknowledged ("exporting");
- a record still exporting: nothing is started again ("exporting");
- a record that landed: its DatasetLanded is published again ("duplicate"); one that failed is
  acknowledged as it is (its PipelineFailed went out when it failed).

`check_all` polls every open record once: from `POST /v1/exports:check` (Cloud Scheduler on
GCP, `SERVICE_CHECKS` in mlpipe_ops.infra) or ingest's own timer on a local stack
(`MLPIPE_EXPORT_CHECK_SECONDS`). A finished export's files are landed like any dataset; a
failed, cancelled or timed-out one is reported as PipelineFailed with the request kept in
quarantine. A transient error (a quota) postpones the record's next check with doubling
backoff. Every write of a record carries a generation precondition: two checks racing on one
record never both move it (the loser skips it; the next check reads the winner's record).

A backend is one `ExportBackend` registered under its source's name in the `IngestRequest`
oneof (`earth_engine`, `bigquery`); nothing here knows which service runs the export. By
default a finished export's objects are landed through ingest's table path (`land`, which
reads them: fine for small CSV samples); a backend with its own `land` replaces that.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from google.api_core import exceptions as gexc

from mlpipe import tracing
from mlpipe.errors import PermanentError, TransientError
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage, parse_envelope
from mlpipe.runtime.failures import FailureReporter
from mlpipe.runtime.steps import Outcome, StepResult, decode_message, permanent
from mlpipe.store import layout
from mlpipe.store.storage import Storage
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)

EXPORTING, LANDED, FAILED = "exporting", "landed", "failed"
# How long a check that is finishing an export (landing or reporting it) holds it: should it
# die meanwhile, a later check finishes it after this.
FINISH_LEASE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class ExportStatus:
    state: Literal["running", "done", "failed"]
    objects: tuple[str, ...] = ()  # gs:// URIs of the exported files under the staging prefix
    reason: str = ""  # machine-readable, e.g. "unknown_asset", "export_failed"
    message: str = ""  # for a person
    transient: bool = False  # a quota error: retried with backoff, not failed


class ExportBackend(Protocol):
    kind: str  # the IngestRequest source it exports: "earth_engine" | "bigquery"

    def start(
        self, request: events_pb2.IngestRequest, staging_uri: str, export_id: str
    ) -> dict[str, str]:
        """Start the export (idempotently: the same export_id starts nothing twice); return
        what to record to poll it (its task or job name). A quota or an unreachable service
        raises TransientError; a request the service refuses, PermanentError."""
        ...

    def poll(self, recorded: dict[str, str]) -> ExportStatus: ...


# Optional, on a backend: `cancel(recorded)` stops an export that ran out of time (else it is
# only reported), and `land(request, objects, requested_at, recorded, *, storage,
# code_version, env)` lands its objects its own way (a large Parquet export checked from its
# job's metadata and copied server-side, say; else they go through `Exports.land`, the table
# path that reads them).
class Cancellable(Protocol):
    def cancel(self, recorded: dict[str, str]) -> None: ...


# Lands a finished export's objects: (the request, the objects, when it was requested) →
# the DatasetLanded; a PermanentError names what is wrong with them.
LandObjects = Callable[
    [events_pb2.IngestRequest, tuple[str, ...], dt.datetime], events_pb2.DatasetLanded
]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Exports:
    storage: Storage
    publisher: Publisher
    backends: dict[str, ExportBackend]
    # How a finished export's objects land when its backend brings no `land` of its own.
    land: LandObjects | None = None
    failures: FailureReporter | None = None  # default: ingest's, on this storage and publisher
    code_version: str = "dev"
    env: str | None = None  # the environment whose pipeline config overrides apply
    timeout_seconds: float = 3600.0  # MLPIPE_EXPORT_TIMEOUT_SECONDS
    backoff_seconds: float = 30.0
    max_backoff_seconds: float = 900.0
    retry_deliveries: int = 5  # MLPIPE_SOURCE_RETRY_DELIVERIES
    clock: Callable[[], dt.datetime] = field(default=_now)

    def __post_init__(self) -> None:
        if self.failures is None:
            self.failures = FailureReporter(
                self.storage, self.publisher, stage="ingest", code_version=self.code_version
            )

    @property
    def reporter(self) -> FailureReporter:
        assert self.failures is not None  # set in __post_init__
        return self.failures

    def handles(self, request: events_pb2.IngestRequest) -> bool:
        return request.WhichOneof("source") in self.backends

    # --- the push ------------------------------------------------------------------------
    def push(self, body: bytes) -> StepResult:
        """A push body of an IngestRequest whose source is an export, as ingest's push route
        takes it (without the web framework): begun, and a permanent failure reported with
        the body kept."""
        message = parse_envelope(body)
        try:
            request = decode_message(events_pb2.IngestRequest, message)
        except PermanentError as exc:
            result = permanent(exc)
        else:
            result = self.begin(request, message)
        if result.outcome is Outcome.PERMANENT and result.failure is not None:
            self.reporter.report(
                reason=result.failure.reason,
                message=result.failure.message,
                payload=message.raw,
                source=message,
                context=result.failure.context,
            )
        return result

    def begin(
        self, request: events_pb2.IngestRequest, message: PushMessage, kind: str = ""
    ) -> StepResult:
        """Start the request's export once, record it and acknowledge; never wait for it. The
        backend is its source's (`kind`: one registered under another name, a large landing's
        validation)."""
        kind = kind or request.WhichOneof("source") or ""
        if not request.dataset:
            return permanent(PermanentError("invalid_message", "IngestRequest.dataset is empty"))
        export_id = layout.export_id_for(request.request_id or message.message_id, request.dataset)
        path = layout.export_record_path(export_id)
        found = self.storage.read(path)
        if found is not None:
            return self._recorded(found.json())
        staging = self.storage.uri(layout.export_staging_prefix(export_id))
        job = self._start(kind, request, message, staging, export_id)
        if isinstance(job, StepResult):
            return job
        record = self._new_record(kind, request, message, export_id, staging, job)
        if self.storage.create_if_absent(path, _json(record)) is None:
            # A concurrent delivery recorded first: the backend started nothing new (same id).
            recorded = self.storage.read(path)
            if recorded is not None:
                return self._recorded(recorded.json())
        log.info("%s export %s started: %s", kind, export_id, job)
        return StepResult("exporting", {"export_id": export_id, "job": job})

    def _start(
        self,
        kind: str,
        request: events_pb2.IngestRequest,
        message: PushMessage,
        staging: str,
        export_id: str,
    ) -> dict[str, Any] | StepResult:
        """The backend's job for a new export, or the permanent outcome of a start refused."""
        try:
            return dict(self.backends[kind].start(request, staging, export_id))
        except PermanentError as exc:
            exc.context = exc.context or self._context(request)
            return permanent(exc)
        except TransientError as exc:
            # A quota or the service down: Pub/Sub redelivers, until the delivery budget
            # below the dead-letter limit is spent; then it is reported, not dead-lettered.
            attempt = message.delivery_attempt
            if 0 < self.retry_deliveries <= attempt:
                failure = PermanentError(
                    "export_not_started",
                    f"{kind} export {export_id} could not be started by delivery {attempt}: {exc}",
                )
                failure.context = self._context(request)
                return permanent(failure)
            raise

    def _new_record(
        self,
        kind: str,
        request: events_pb2.IngestRequest,
        message: PushMessage,
        export_id: str,
        staging: str,
        job: dict[str, Any],
    ) -> dict[str, Any]:
        """The export's record as first written: what a later check needs to finish it."""
        now = self.clock()
        return {
            "export_id": export_id,
            "kind": kind,
            "dataset": request.dataset,
            "request_id": request.request_id,
            "request": _b64(request.SerializeToString()),
            # Kept whole, as a rejected push is (the envelope), should the export fail.
            "payload": _b64(message.raw or message.data),
            "attributes": dict(message.attributes),
            "message_id": message.message_id,
            "subscription": message.subscription,
            "requested_at": (
                request.requested_at.ToDatetime(dt.UTC)
                if request.HasField("requested_at")
                else message.publish_time
            ).isoformat(),
            "started_at": now.isoformat(),
            "deadline_at": (now + dt.timedelta(seconds=self._time_limit(request))).isoformat(),
            "staging_uri": staging,
            "job": job,
            "state": EXPORTING,
            "checks": 0,
            "transient_failures": 0,
            "next_check_at": now.isoformat(),
            "traceparent": tracing.traceparent(),
        }

    def _recorded(self, record: dict[str, Any]) -> StepResult:
        detail = {"export_id": record["export_id"], "job": record["job"]}
        if record["state"] == LANDED:
            landed = events.from_json(events_pb2.DatasetLanded, record["landed"])
            self.publisher.publish(landed)
            return StepResult(
                "duplicate", {**detail, "dataset_uri": landed.dataset.uri}, landed.context.run_id
            )
        if record["state"] == FAILED:
            return StepResult("failed", {**detail, "failure": record["failure"]})
        return StepResult("exporting", detail)

    def _time_limit(self, request: events_pb2.IngestRequest) -> float:
        kind = request.WhichOneof("source") or ""
        source = getattr(request, kind, None)
        # EarthEngineSource.time_limit_seconds, BigQuerySource.timeout_seconds.
        limit = float(
            getattr(source, "time_limit_seconds", 0) or getattr(source, "timeout_seconds", 0) or 0
        )
        return limit if limit > 0 else self.timeout_seconds

    def _context(self, request: events_pb2.IngestRequest) -> events_pb2.RunContext:
        return events.context(
            producer="ingest",
            code_version=self.code_version,
            pipeline=request.dataset,
            request_id=request.request_id,
        )

    # --- the check -----------------------------------------------------------------------
    def check_all(self) -> list[dict[str, Any]]:
        """Poll every open export once; what each check did. One export that cannot be
        checked now does not hold up the others."""
        ids = layout.export_ids(self.storage.list(layout.EXPORTS))
        checked = []
        for export_id in ids:
            try:
                checked.append(self.check(export_id))
            except Exception as exc:
                log.exception(
                    "export %s could not be checked; the next check tries again", export_id
                )
                checked.append({"export_id": export_id, "state": "unchecked", "detail": str(exc)})
        return checked

    def check(self, export_id: str) -> dict[str, Any]:
        path = layout.export_record_path(export_id)
        found = self.storage.read(path)
        if found is None:
            return {"export_id": export_id, "state": "absent"}
        record: dict[str, Any] = found.json()
        summary = {"export_id": export_id, "kind": record["kind"], "state": record["state"]}
        if record["state"] != EXPORTING:
            return summary
        now = self.clock()
        not_due = self._not_due(record, summary, now)
        if not_due is not None:
            return not_due
        backend = self.backends[record["kind"]]
        status = _polled(backend, record)
        record["checks"] += 1
        request = events_pb2.IngestRequest.FromString(base64.b64decode(record["request"]))
        timed_out = now >= dt.datetime.fromisoformat(record["deadline_at"])
        generation = found.generation
        if status.state != "running" or timed_out:
            # Finishing lands or reports once: the first check to move the record does it
            # (another instance's timer may be checking the same export).
            claimed = self._claim(path, generation, record, now)
            if claimed is None:
                return {**summary, "detail": "being finished by another check"}
            generation = claimed
        if status.state == "running":
            if timed_out:
                return self._time_out(path, generation, record, request, backend, now)
            self._still_running(path, found.generation, record, status, now)
            return {**summary, "detail": "running", "transient": status.transient}
        if status.state == "failed":
            return self._fail(
                path,
                generation,
                record,
                request,
                status.reason or "export_failed",
                status.message or f"{record['kind']} export {export_id} failed",
            )
        # The landing continues the trace of the delivery that started the export.
        with tracing.span(
            f"{record['kind']} export landed",
            parent=record.get("traceparent", ""),
            attributes={"mlpipe.export_id": export_id},
        ):
            return self._land(path, generation, record, request, backend, status, now, summary)

    def _not_due(
        self, record: dict[str, Any], summary: dict[str, Any], now: dt.datetime
    ) -> dict[str, Any] | None:
        """Why this check leaves a running export alone (None: it is due)."""
        if now < dt.datetime.fromisoformat(record["next_check_at"]):
            return {**summary, "waiting_until": record["next_check_at"]}
        finishing = record.get("finishing_until")
        if finishing and now < dt.datetime.fromisoformat(finishing):
            return {**summary, "detail": "being finished by another check"}
        if record["kind"] not in self.backends:
            return {**summary, "detail": f"no backend for {record['kind']} here"}
        return None

    def _time_out(
        self,
        path: str,
        generation: int,
        record: dict[str, Any],
        request: events_pb2.IngestRequest,
        backend: ExportBackend,
        now: dt.datetime,
    ) -> dict[str, Any]:
        """Cancel an export past its time limit and report it."""
        self._cancel(backend, record)
        started = dt.datetime.fromisoformat(record["started_at"])
        return self._fail(
            path,
            generation,
            record,
            request,
            "export_timeout",
            f"{record['kind']} export {record['export_id']} ({_job_name(record)}) did not finish "
            f"within {(now - started).total_seconds():.0f}s of its start (time limit "
            f"{self._time_limit(request):.0f}s); it was cancelled",
        )

    def _still_running(
        self,
        path: str,
        generation: int,
        record: dict[str, Any],
        status: ExportStatus,
        now: dt.datetime,
    ) -> None:
        """Record one more check of a running export: the next check at once, or after a
        backoff that doubles with each transient failure in a row (up to its cap)."""
        if status.transient:
            record["transient_failures"] += 1
            wait = min(
                self.max_backoff_seconds,
                self.backoff_seconds * 2 ** (record["transient_failures"] - 1),
            )
            record["next_check_at"] = (now + dt.timedelta(seconds=wait)).isoformat()
            record["last_error"] = f"{status.reason}: {status.message}"
            log.warning(
                "%s export %s: %s; next check in %.0fs",
                record["kind"],
                record["export_id"],
                record["last_error"],
                wait,
            )
        else:
            record["transient_failures"] = 0
            record["next_check_at"] = now.isoformat()
        self._write(path, generation, record)

    def _land(
        self,
        path: str,
        generation: int,
        record: dict[str, Any],
        request: events_pb2.IngestRequest,
        backend: ExportBackend,
        status: ExportStatus,
        now: dt.datetime,
        summary: dict[str, Any],
    ) -> dict[str, Any]:
        """A finished export's objects landed as the dataset (the backend's own way, or the
        checked table path), DatasetLanded published and the record closed; a landing that
        is refused is reported as the export's failure."""
        export_id = record["export_id"]
        when = dt.datetime.fromisoformat(record["requested_at"])
        try:
            own = getattr(backend, "land", None)
            if own is not None:
                landed = own(
                    request,
                    status.objects,
                    when,
                    dict(record["job"]),
                    storage=self.storage,
                    code_version=self.code_version,
                    env=self.env,
                )
            elif self.land is not None:
                landed = self.land(request, status.objects, when)
            else:
                raise PermanentError(
                    "no_landing", f"no way to land a {record['kind']} export is configured"
                )
        except PermanentError as exc:
            return self._fail(
                path,
                generation,
                record,
                request,
                exc.reason,
                f"{record['kind']} export {export_id}: {exc.message}",
            )
        self.publisher.publish(landed)
        record["state"] = LANDED
        record["landed"] = events.to_json(landed)
        record["finished_at"] = now.isoformat()
        record.pop("finishing_until", None)
        self._write(path, generation, record)
        log.info(
            "%s export %s landed %s",
            record["kind"],
            export_id,
            landed.dataset.uri,
            extra={"run_id": landed.context.run_id},
        )
        return {**summary, "state": LANDED, "dataset_uri": landed.dataset.uri}

    def _cancel(self, backend: ExportBackend, record: dict[str, Any]) -> None:
        cancel = getattr(backend, "cancel", None)
        if cancel is None:
            return
        try:
            cancel(dict(record["job"]))
        except Exception:  # the failure is reported either way; the service may end it later
            log.exception("could not cancel export %s", record["export_id"])

    def _fail(
        self,
        path: str,
        generation: int,
        record: dict[str, Any],
        request: events_pb2.IngestRequest,
        reason: str,
        message: str,
    ) -> dict[str, Any]:
        """Report the failure (the request kept in quarantine), then mark the record: a crash
        in between reports it twice rather than never."""
        payload = base64.b64decode(record["payload"])
        uri = self.reporter.quarantine(
            reason,
            payload,
            key=record["message_id"] or record["export_id"],
            metadata={"message": message[:1000], "subscription": record["subscription"]},
        )
        source = PushMessage(
            data=payload,
            attributes=dict(record.get("attributes") or {}),
            message_id=record["message_id"],
            publish_time=dt.datetime.fromisoformat(record["requested_at"]),
            subscription=record["subscription"],
        )
        self.reporter.report(
            reason=reason,
            message=message,
            source=source,
            context=self._context(request),
            quarantine_uri=uri,
        )
        record["state"] = FAILED
        record.pop("finishing_until", None)
        record["failure"] = {"reason": reason, "message": message, "quarantine_uri": uri}
        record["finished_at"] = self.clock().isoformat()
        self._write(path, generation, record)
        return {
            "export_id": record["export_id"],
            "kind": record["kind"],
            "state": FAILED,
            "reason": reason,
        }

    def _claim(
        self, path: str, generation: int, record: dict[str, Any], now: dt.datetime
    ) -> int | None:
        """Mark the record as being finished (for a lease) if it has not moved; its new
        generation, or None when another check moved it first."""
        claimed = {**record, "finishing_until": (now + FINISH_LEASE).isoformat()}
        try:
            new = self.storage.write(
                path,
                _json(claimed),
                content_type="application/json",
                if_generation_match=generation,
            )
        except gexc.PreconditionFailed:
            return None
        record["finishing_until"] = claimed["finishing_until"]
        return new

    def _write(self, path: str, generation: int, record: dict[str, Any]) -> None:
        try:
            self.storage.write(
                path,
                _json(record),
                content_type="application/json",
                if_generation_match=generation,
            )
        except gexc.PreconditionFailed:
            log.info("export record %s moved meanwhile; the next check reads it", path)


def _job_name(record: dict[str, Any]) -> str:
    job = record.get("job") or {}
    return str(job.get("operation") or job.get("job") or next(iter(job.values()), ""))


def _json(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode()


class LazyBackend:
    """A backend built on first use (its client library is imported then, not at start)."""

    def __init__(self, kind: str, make: Callable[[], ExportBackend]) -> None:
        self.kind = kind
        self._make = make
        self._backend: ExportBackend | None = None

    @property
    def backend(self) -> ExportBackend:
        if self._backend is None:
            self._backend = self._make()
        return self._backend

    def start(
        self, request: events_pb2.IngestRequest, staging_uri: str, export_id: str
    ) -> dict[str, str]:
        return self.backend.start(request, staging_uri, export_id)

    def poll(self, recorded: dict[str, str]) -> ExportStatus:
        return self.backend.poll(recorded)

    def __getattr__(self, name: str) -> Any:
        # The optional parts (cancel, land): present if the backend has them.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.backend, name)


def check_exports(exports: Exports) -> list[dict[str, Any]]:
    """Poll every open export once (`POST /v1/exports:check`, ingest's timer)."""
    return exports.check_all()


def _polled(backend: ExportBackend, record: dict[str, Any]) -> ExportStatus:
    """The export's state from its backend; a quota or an outage, on the call or reported with
    whatever state, is retried with backoff: "running", transient."""
    try:
        status = backend.poll(dict(record["job"]))
    except TransientError as exc:
        return ExportStatus("running", reason="unavailable", message=str(exc), transient=True)
    if status.transient and status.state != "running":
        return ExportStatus("running", reason=status.reason, message=status.message, transient=True)
    return status
