"""Large landings: a `gcs` source at or over MLPIPE_INGEST_BEAM_MIN_BYTES is validated by a
Beam job (mlpipe_batch.validate: the same checks as `dataset:`, part by part), never read
into ingest.

It is an export backend (mlpipe_ingest.exports) under its own kind, `large_gcs`: the push
starts the job and records it (`ingest/exports/<export_id>.json`) and is acknowledged; a
later check (ingest's timer, `POST /v1/exports:check`) reads the job's verdict and lands the
object or reports it. One job per landing: the job's record,
`ingest/exports/<export_id>/validation.json`, is created once, so a redelivery, or a second
delivery racing the first, finds the job that was started; on Dataflow the job's name, derived
from the export id, guards the same (one active job of a name per project and region).

A valid object is landed by a server-side rewrite of the generation the job read to
`datasets/<name>/dt=…/<sha256[:16]>.<csv|parquet>` (its bytes as they are; the sha256 is the
job's, of those bytes), and the landing starts training as any landing does. An invalid one
stays where it is, unchanged; PipelineFailed names it, its generation, the first bad data
row and the reason, and the request is kept under quarantine/.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from google.api_core import exceptions as gexc

from mlpipe import tracing
from mlpipe.errors import PermanentError, TransientError
from mlpipe.messaging import events
from mlpipe.messaging.validation_jobs import ValidationSpec
from mlpipe.ml.config import load_pipeline_config
from mlpipe.ml.validation import describe_schema, schema_of
from mlpipe.runtime import labels
from mlpipe.runtime.dataflow_jobs import FlexTemplateJobs
from mlpipe.runtime.job_process import (
    ENDED,
    JobProcesses,
    batch_job_installed,
    direct_runner_command,
)
from mlpipe.store import layout
from mlpipe.store.storage import Storage, parse_gs_uri
from mlpipe.v1 import events_pb2
from mlpipe_ingest.exports import ExportStatus
from mlpipe_ingest.sources import SourceSettings, gcs_object

log = logging.getLogger(__name__)

KIND = "large_gcs"
FORMATS = ("csv", "parquet")
CONTENT_TYPES = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


class ValidationLauncher(Protocol):
    name: str

    def launch(self, spec: ValidationSpec) -> dict[str, Any]: ...

    def state(self, handle: dict[str, Any]) -> str: ...

    def stop(self, handle: dict[str, Any]) -> None: ...


@dataclass
class LocalValidation:
    """`python -m mlpipe_batch --spec …` as a process of its own on the DirectRunner (a local
    stack; the service image does not hold the job: MLPIPE_VALIDATION_LAUNCHER=dataflow),
    followed by its handle (mlpipe.runtime.job_process)."""

    workers: int = 2
    mode: str = "in_memory"
    log_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "mlpipe-validate")
    python: str = sys.executable
    name: str = "local"
    processes: JobProcesses = field(default_factory=JobProcesses)

    def command(self, spec: ValidationSpec) -> list[str]:
        return direct_runner_command(spec.to_json(), self.mode, self.workers, self.python)

    def launch(self, spec: ValidationSpec) -> dict[str, Any]:
        if not batch_job_installed():
            raise PermanentError(
                "validation_job_unavailable",
                f"{spec.input_uri}: the validation job (mlpipe_batch) is not installed here; "
                "run it on Dataflow (MLPIPE_VALIDATION_LAUNCHER=dataflow) or raise "
                "MLPIPE_INGEST_BEAM_MIN_BYTES",
            )
        log_path = self.log_dir / f"{spec.export_id}-{int(time.time())}.log"
        return self.processes.start(self.command(spec), log_path)

    def state(self, handle: dict[str, Any]) -> str:
        return self.processes.state(handle)

    def stop(self, handle: dict[str, Any]) -> None:
        self.processes.stop(handle)

    def wait(self, timeout: float) -> None:
        self.processes.wait(timeout)


@dataclass(frozen=True)
class DataflowValidationOptions:
    """Where the validation job runs on Dataflow: the batch job's Flex Template (its image is
    the batch image, cloudbuild/triggers/batch.yaml), ingest's MLPIPE_VALIDATION_DATAFLOW_*."""

    project: str
    region: str
    template: str  # gs://…/batch.json
    service_account: str = ""
    temp_location: str = ""
    staging_location: str = ""
    machine_type: str = ""
    max_workers: int = 0
    endpoint: str = ""  # the API's endpoint when not Google's (a stand-in)
    env: str = ""


def validation_job_name(spec: ValidationSpec) -> str:
    """One active Dataflow job of a name per project and region: the name guards the landing."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"mlpipe-validate-{spec.dataset}".lower())
    digest = hashlib.sha256(spec.export_id.encode()).hexdigest()[:12]
    return f"{base[:60].strip('-')}-{digest}"


@dataclass
class DataflowValidation:
    """The validation job's Flex Template launched through the Dataflow API
    (google-cloud-dataflow-client, REST), followed with jobs.get."""

    options: DataflowValidationOptions
    credentials: Any = None
    name: str = "dataflow"

    @property
    def jobs(self) -> FlexTemplateJobs:
        return FlexTemplateJobs(self.options.endpoint, self.credentials)

    def _clients(self) -> tuple[Any, Any]:
        return self.jobs.clients()

    def launch_request(self, spec: ValidationSpec) -> Any:
        o = self.options
        return FlexTemplateJobs.launch_request(
            project=o.project,
            region=o.region,
            job_name=validation_job_name(spec),
            template=o.template,
            parameters={"spec": spec.to_json()},
            environment={
                "service_account_email": o.service_account,
                "temp_location": o.temp_location,
                "staging_location": o.staging_location,
                "machine_type": o.machine_type,
                "max_workers": o.max_workers,
                "additional_user_labels": {
                    "mlpipe-validation": "1",
                    "mlpipe-dataset": labels.label_value(spec.dataset),
                    "mlpipe-env": labels.label_value(o.env),
                },
            },
        )

    def launch(self, spec: ValidationSpec) -> dict[str, Any]:
        try:
            return self.jobs.launch(self.launch_request(spec))
        except (gexc.InvalidArgument, gexc.PermissionDenied, gexc.NotFound) as exc:
            raise PermanentError(
                "validation_not_started", f"{spec.input_uri}: Dataflow refused the job: {exc}"
            ) from exc
        except (gexc.ServiceUnavailable, gexc.TooManyRequests, gexc.InternalServerError) as exc:
            raise TransientError(f"Dataflow: {exc}") from exc

    def state(self, handle: dict[str, Any]) -> str:
        return self.jobs.state(handle)

    def stop(self, handle: dict[str, Any]) -> None:
        self.jobs.cancel(handle)


@dataclass
class LargeLandings:
    """The export backend of large `gcs` landings (kind `large_gcs`)."""

    storage: Storage
    launcher: ValidationLauncher
    min_bytes: int  # MLPIPE_INGEST_BEAM_MIN_BYTES; 0: never
    sources: SourceSettings
    env: str | None = None
    chunk_rows: int = 50_000
    # A record with no handle yet (its launch was cut short) this long is a lost launch.
    launch_timeout_seconds: float = 300.0
    kind: str = KIND

    def takes(self, request: events_pb2.IngestRequest) -> bool:
        """Whether the request is a `gcs` source of a CSV or Parquet object of at least
        `min_bytes` (one metadata read). Anything the fast path would refuse (a bucket not
        allowed, a bad name, an object that is not there) is left to it to report."""
        if self.min_bytes <= 0 or request.WhichOneof("source") != "gcs":
            return False
        try:
            bucket, name, fmt = gcs_object(request.gcs, self.sources)
            blob = self.storage.client.bucket(bucket).get_blob(name)
        except (PermanentError, gexc.NotFound, gexc.Forbidden):
            return False
        return fmt in FORMATS and blob is not None and int(blob.size or 0) >= self.min_bytes

    # --- the backend ---------------------------------------------------------------------
    def start(
        self, request: events_pb2.IngestRequest, staging_uri: str, export_id: str
    ) -> dict[str, str]:
        bucket, name, fmt = gcs_object(request.gcs, self.sources)
        blob = self.storage.client.bucket(bucket).get_blob(name)
        if blob is None:
            raise PermanentError("unreachable", f"gcs source {request.gcs.uri} does not exist")
        spec = ValidationSpec(
            project=self.storage.client.project,
            bucket=self.storage.bucket_name,
            export_id=export_id,
            dataset=request.dataset,
            input_uri=f"gs://{bucket}/{name}",
            generation=int(blob.generation or 0),
            format=fmt,
            env=self.env,
            chunk_rows=self.chunk_rows,
        )
        record = {
            "spec": spec.to_json(),
            "launcher": self.launcher.name,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        generation = self.storage.create_if_absent(spec.job_path, _dumps(record))
        if generation is None:
            return self._started(spec)
        try:
            handle = self.launcher.launch(spec)
        except Exception:
            # Not launched: the next delivery may try again.
            with contextlib.suppress(gexc.PreconditionFailed, gexc.NotFound):
                self.storage.delete(spec.job_path, if_generation_match=generation)
            raise
        with contextlib.suppress(gexc.PreconditionFailed):
            self.storage.write_json(
                spec.job_path, {**record, "handle": handle}, if_generation_match=generation
            )
        log.info("validation of %s started (%s): %s", spec.input_uri, self.launcher.name, handle)
        return self._job(spec, handle)

    def _started(self, spec: ValidationSpec) -> dict[str, str]:
        """The job another delivery started for this landing; transient while it launches."""
        found = self.storage.read_json(spec.job_path) or {}
        handle = found.get("handle")
        if handle is None:
            created = dt.datetime.fromisoformat(
                found.get("created_at") or dt.datetime.now(dt.UTC).isoformat()
            )
            if (dt.datetime.now(dt.UTC) - created).total_seconds() > self.launch_timeout_seconds:
                # That launch died before it recorded its job: forget it, the next tries again.
                with contextlib.suppress(gexc.NotFound):
                    self.storage.delete(spec.job_path)
            raise TransientError(f"the validation of {spec.input_uri} is being launched")
        return self._job(ValidationSpec.from_json(found["spec"]), handle)

    def _job(self, spec: ValidationSpec, handle: dict[str, Any]) -> dict[str, str]:
        return {
            "launcher": self.launcher.name,
            "job": str(handle.get("name") or handle.get("job_id") or handle.get("pid")),
            "handle": json.dumps(handle, sort_keys=True),
            "spec": spec.to_json(),
        }

    def poll(self, recorded: dict[str, str]) -> ExportStatus:
        spec = ValidationSpec.from_json(recorded["spec"])
        verdict = self.storage.read_json(spec.verdict_path)
        if verdict is not None:
            if verdict.get("valid"):
                return ExportStatus("done", objects=(spec.input_uri,))
            return ExportStatus(
                "failed", reason=str(verdict["reason"]), message=failure_message(spec, verdict)
            )
        handle = json.loads(recorded["handle"])
        state = self.launcher.state(handle)
        if state == ENDED:
            # It may have written its verdict as it ended.
            if self.storage.exists(spec.verdict_path):
                return self.poll(recorded)
            return ExportStatus(
                "failed",
                reason="validation_job_lost",
                message=f"the validation job of {spec.input_uri} ({self.launcher.name} "
                f"{handle}) ended without a verdict; the object is kept where it is",
            )
        return ExportStatus("running", message=f"validation job {state}")

    def cancel(self, recorded: dict[str, str]) -> None:
        self.launcher.stop(json.loads(recorded["handle"]))

    def land(
        self,
        request: events_pb2.IngestRequest,
        objects: tuple[str, ...],
        requested_at: dt.datetime,
        recorded: dict[str, str],
        *,
        storage: Storage,
        code_version: str,
        env: str | None = None,
    ) -> events_pb2.DatasetLanded:
        """The validated object copied server-side (the generation the job read) to where its
        content names it, create-if-absent."""
        spec = ValidationSpec.from_json(recorded["spec"])
        verdict = storage.read_json(spec.verdict_path) or {}
        config = load_pipeline_config(storage, request.dataset, env)
        ctx = events.context(
            producer="ingest",
            code_version=code_version,
            pipeline=config.name,
            config_sha256=config.sha256(),
            request_id=request.request_id,
        )
        ctx.requested_at.CopyFrom(events.timestamp(requested_at))
        sha, header = str(verdict["sha256"]), [str(c) for c in verdict["columns"]]
        rows = int(verdict["rows"])
        path = layout.dataset_path(config.name, requested_at.date(), sha[:16], spec.format)
        metadata = {
            "sha256": sha,
            "source": spec.input_uri[:1000],
            "row_count": str(rows),
            "columns": ",".join(header),
            "schema": describe_schema(schema_of(config, header)),
            "request_id": request.request_id,
            "requested_at": requested_at.isoformat(),
            "validated_by": f"{self.launcher.name}:{recorded.get('job', '')}"[:1000],
            **tracing.object_metadata(),
        }
        generation, already, landed_at = copy_once(
            storage, spec.input_uri, spec.generation, path, metadata, CONTENT_TYPES[spec.format]
        )
        ctx.run_id = layout.run_id_for(sha, ctx.config_sha256)
        return events_pb2.DatasetLanded(
            context=ctx,
            dataset=events_pb2.DatasetRef(
                uri=storage.uri(path),
                generation=generation,
                sha256=sha,
                name=config.name,
                row_count=rows,
                data_format=events.DATA_FORMAT.of(spec.format),
                landed_at=events.timestamp(landed_at),
            ),
            already_present=already,
            columns=header,
        )


def failure_message(spec: ValidationSpec, verdict: dict[str, Any]) -> str:
    """What PipelineFailed says of an object that failed its validation: the file, its
    generation, the first bad data row and why; and that it is kept."""
    row = int(verdict.get("row") or 0)
    where = f"first bad data row {row}" if row else "the file as a whole"
    return (
        f"{spec.input_uri} (generation {spec.generation}) failed validation against pipeline "
        f"{spec.dataset!r}, {where}: {verdict.get('message')}; the object is kept there, "
        "unchanged"
    )


def copy_once(
    storage: Storage,
    source_uri: str,
    source_generation: int,
    path: str,
    metadata: dict[str, str],
    content_type: str,
) -> tuple[int, bool, dt.datetime]:
    """GCS rewrites the source object (that generation) to `path` in the landing bucket unless
    `path` exists: (its generation, whether it was there already, when it landed). The bytes
    never pass through this process."""
    existing = storage.bucket.get_blob(path)
    if existing is not None:
        return int(existing.generation), True, existing.time_created or dt.datetime.now(dt.UTC)
    bucket, name = parse_gs_uri(source_uri)
    source = storage.client.bucket(bucket).blob(name, generation=source_generation)
    target = storage.bucket.blob(path)
    target.metadata = metadata
    target.content_type = content_type
    try:
        token, _, _ = target.rewrite(source, if_generation_match=0)
        while token is not None:
            token, _, _ = target.rewrite(source, token=token, if_generation_match=0)
    except gexc.PreconditionFailed:
        existing = storage.bucket.get_blob(path)
        if existing is None:
            return 0, True, dt.datetime.now(dt.UTC)
        return int(existing.generation), True, existing.time_created or dt.datetime.now(dt.UTC)
    return int(target.generation or 0), False, dt.datetime.now(dt.UTC)


def _dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode()


def validation_launcher(settings: Any) -> ValidationLauncher:
    """The launcher ingest's settings name (IngestSettings.validation_*)."""
    if settings.validation_launcher == "dataflow":
        credentials = None
        if settings.validation_dataflow_endpoint:
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()  # a stand-in signs nothing
        return DataflowValidation(
            DataflowValidationOptions(
                project=settings.project,
                region=settings.region,
                template=settings.validation_dataflow_template,
                service_account=settings.validation_dataflow_service_account,
                temp_location=settings.validation_dataflow_temp_location,
                staging_location=settings.validation_dataflow_staging_location,
                machine_type=settings.validation_dataflow_machine_type,
                max_workers=settings.validation_dataflow_max_workers,
                endpoint=settings.validation_dataflow_endpoint,
                env=settings.env,
            ),
            credentials=credentials,
        )
    return LocalValidation(
        workers=settings.validation_local_workers, mode=settings.validation_local_mode
    )
