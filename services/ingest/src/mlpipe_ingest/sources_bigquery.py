"""BigQuery as a source: a query (or a table) exported to Parquet, checked from its metadata,
and copied server-side to its dataset path. Nothing of the data passes through memory.

The export is a long-running job, so it follows ingest's export mechanism (start, then poll
on later checks, never wait inside a push):

- `start`: a query runs as a query job whose id is derived from the export id (its result goes
  to BigQuery's anonymous result table); a table is used as it is (one partition with a
  decorator). A job id that already exists (409 Conflict) means a redelivery: the job is looked
  up, not started again.
- `poll`: the query job done → the extract job (its id also derived from the export id) writes
  `gs://<bucket>/ingest/exports/<export_id>/data.parquet`; the extract job done → "done".
- `land_export(storage, request, status.objects, backend.exported_table(recorded), config, ...)`
  on "done": the schema and row count (table metadata) are checked against the pipeline's
  `dataset:` contract (`mlpipe.ml.validation.check_schema`) before anything lands; the sha256 is
  computed by streaming the object in bounded ranged reads, and the object is rewritten by GCS
  itself to `datasets/<name>/dt=…/<sha16>.parquet` with `if_generation_match=0`.

One file per export: BigQuery writes at most 1 GB of logical data to a single file, and a
landing is one object (the trainer reads one file). A result over the limit is refused before
its extract starts (`too_large`), naming the size: narrow the dates or the partition. Parquet
shards cannot be concatenated by GCS compose, and landing shards as separate objects would
train one run per shard, so shards are never written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery.retry import DEFAULT_RETRY

from mlpipe.errors import PermanentError, TransientError
from mlpipe.messaging import events
from mlpipe.ml.config import PipelineConfig, load_pipeline_config
from mlpipe.ml.validation import SourceKind, check_schema, describe_schema, schema_of
from mlpipe.runtime.labels import run_labels
from mlpipe.store import layout
from mlpipe.store.storage import Storage
from mlpipe.v1 import events_pb2
from mlpipe_ingest.exports import ExportStatus

KIND = "bigquery"
# project.dataset.table: project ids are 6-30 of [a-z0-9-] (an optional "domain:" prefix),
# dataset ids letters, digits and underscores, table ids may also hold dashes and spaces are
# not accepted here.
TABLE = re.compile(
    r"^(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]\.[A-Za-z0-9_]{1,1024}\.[A-Za-z0-9_-]{1,1024}\Z"
)
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}\Z")
# A partition decorator: yyyy, yyyymm, yyyymmdd or yyyymmddhh (yearly to hourly partitions).
PARTITION = re.compile(r"^\d{4}(\d{2}){0,3}\Z")
QUOTA_REASONS = frozenset({"quotaExceeded", "rateLimitExceeded"})
# BigQuery's ErrorProto reasons → ours (PipelineFailed.reason).
REASONS = {
    "notFound": "unknown_table",
    "invalidQuery": "query_error",
    "accessDenied": "access_denied",
    "stopped": "export_cancelled",
}
KINDS: dict[str, SourceKind] = {
    "INTEGER": "numeric",
    "INT64": "numeric",
    "FLOAT": "numeric",
    "FLOAT64": "numeric",
    "NUMERIC": "numeric",
    "BIGNUMERIC": "numeric",
    "DATE": "datetime",
    "DATETIME": "datetime",
    "TIMESTAMP": "datetime",
    "STRING": "text",
    "BOOLEAN": "boolean",
    "BOOL": "boolean",
}
STAGED_NAME = "data.parquet"
PARQUET_TYPE = "application/vnd.apache.parquet"


@dataclass(frozen=True)
class BigQuerySettings:
    project: str  # the project the jobs run (and are billed) in
    location: str = "US"
    timeout_seconds: float = 3600.0
    single_file_bytes: int = 1_000_000_000
    # The client's own retries of one call (rate limits, 5xx) stop after this: a call made
    # inside a push must not wait for minutes. What still fails is retried by the next check.
    request_seconds: float = 10.0
    env: str = ""  # the environment (MLPIPE_ENV): a label of the jobs (job_labels)


@dataclass(frozen=True)
class ExportedTable:
    """What BigQuery says of the exported data, read from the table's metadata."""

    source: str  # for messages: the query job or the table
    columns: dict[str, SourceKind]
    num_rows: int


@dataclass(frozen=True)
class StreamedDigest:
    sha256: str
    size: int
    chunks: int
    largest_chunk: int


def bigquery_client(project: str, url: str = "") -> bigquery.Client:
    """The real API, or the local stand-in at `url` (anonymous, as with the emulators)."""
    if url:
        return bigquery.Client(
            project=project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": url},
        )
    return bigquery.Client(project=project)


# --- request builders (pure) ----------------------------------------------------------------
def check_source(source: events_pb2.BigQuerySource) -> None:
    """Refuse a request that cannot name a job: PermanentError("invalid_message", ...)."""
    problems = []
    which = source.WhichOneof("input")
    if which is None or not (source.query.strip() or source.table):
        problems.append("name a query or a table")
    if which == "table" and not TABLE.match(source.table):
        problems.append(f"table {source.table!r} is not project.dataset.table")
    for name in ("start_date", "end_date"):
        value = getattr(source, name)
        if value and not _is_date(value):
            problems.append(f"{name} {value!r} is not a date (YYYY-MM-DD)")
    if which == "table" and (source.start_date or source.end_date):
        problems.append("start_date/end_date bind a query's parameters; a table takes partition")
    if source.partition and (which != "table" or not PARTITION.match(source.partition)):
        problems.append(
            f"partition {source.partition!r}: a table's partition decorator "
            "(yyyy, yyyymm, yyyymmdd or yyyymmddhh)"
        )
    if source.start_date and source.end_date and source.start_date > source.end_date:
        problems.append(f"start_date {source.start_date} is after end_date {source.end_date}")
    if source.timeout_seconds < 0:
        problems.append("timeout_seconds cannot be negative")
    if problems:
        raise PermanentError("invalid_message", "bigquery source: " + "; ".join(problems))


def _is_date(value: str) -> bool:
    if not DATE.match(value):
        return False
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        return False
    return True


def job_ids(export_id: str) -> tuple[str, str]:
    """The query and extract job ids of an export: the same on every delivery."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,200}", export_id):
        raise ValueError(f"export id {export_id!r} cannot name a BigQuery job")
    return f"mlpipe_{export_id}_query", f"mlpipe_{export_id}_extract"


def job_labels(request: events_pb2.IngestRequest, env: str, export_id: str) -> dict[str, str]:
    """The labels of an export's BigQuery jobs, for the billing export (docs/cost.md): its
    pipeline (the dataset's name), environment, request and export. The run id is not known
    yet (it derives from the landed bytes): the run's records name its request."""
    return run_labels(
        "", request.dataset, env, mlpipe_request_id=request.request_id, mlpipe_export_id=export_id
    )


def query_job_config(
    source: events_pb2.BigQuerySource, labels: dict[str, str] | None = None
) -> bigquery.QueryJobConfig:
    """Standard SQL, with the dates bound as DATE parameters @start_date and @end_date;
    labelled with `labels` (job_labels)."""
    params = [
        bigquery.ScalarQueryParameter(name, "DATE", getattr(source, name))
        for name in ("start_date", "end_date")
        if getattr(source, name)
    ]
    config = bigquery.QueryJobConfig(use_legacy_sql=False, labels=dict(labels or {}))
    if params:
        config.query_parameters = params
    return config


def table_reference(source: events_pb2.BigQuerySource, project: str) -> bigquery.TableReference:
    """The table to export, with its partition decorator when one is asked for."""
    table = source.table + (f"${source.partition}" if source.partition else "")
    return bigquery.TableReference.from_string(table, default_project=project)


def extract_job_config(labels: dict[str, str] | None = None) -> bigquery.ExtractJobConfig:
    return bigquery.ExtractJobConfig(
        destination_format=bigquery.DestinationFormat.PARQUET, labels=dict(labels or {})
    )


def staged_uri(staging_uri: str) -> str:
    """The one file an export writes (no wildcard: see the module's docstring)."""
    return staging_uri.rstrip("/") + "/" + STAGED_NAME


def describe(source: events_pb2.BigQuerySource) -> str:
    if source.WhichOneof("input") == "table":
        return f"bigquery:{source.table}" + (f"${source.partition}" if source.partition else "")
    dates = f" [{source.start_date}..{source.end_date}]" if source.start_date else ""
    return "bigquery:query" + dates


# --- errors -------------------------------------------------------------------------------
class ExportUnavailable(TransientError):
    """Worth retrying later: `reason` is "quota_exceeded" or "unavailable"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _reason_of(exc: gexc.GoogleAPICallError) -> str:
    try:
        return str(exc.errors[0]["reason"])
    except (IndexError, KeyError, TypeError):
        return ""


def classify(exc: Exception, what: str) -> PermanentError | ExportUnavailable:
    """A refused call: quota, rate limits, 5xx and lost connections are transient; the rest
    names its cause."""
    if isinstance(exc, gexc.GoogleAPICallError):
        reason = _reason_of(exc)
        if reason in QUOTA_REASONS or isinstance(exc, gexc.TooManyRequests):
            return ExportUnavailable(
                "quota_exceeded", f"{what}: BigQuery quota ({reason or exc.code}): {exc.message}"
            )
        if isinstance(exc, gexc.ServerError):
            return ExportUnavailable("unavailable", f"{what}: BigQuery unavailable: {exc.message}")
        if isinstance(exc, gexc.NotFound):
            return PermanentError("unknown_table", f"{what}: {exc.message}")
        if isinstance(exc, gexc.BadRequest):
            mapped = REASONS.get(reason, "export_failed")
            return PermanentError(mapped, f"{what}: {exc.message}")
        return PermanentError(REASONS.get(reason, "export_failed"), f"{what}: {exc.message}")
    return ExportUnavailable("unavailable", f"{what}: BigQuery unreachable: {exc}")


def job_failure(job: Any, what: str) -> PermanentError:
    """A job that ended with errorResult. A job id is used once, so even a job that ended on a
    quota cannot run again under it: that request is failed (`quota_exceeded`), to be sent
    again later; quota refusals of the request that starts a job are transient instead."""
    error = job.error_result or {}
    reason = str(error.get("reason", ""))
    message = f"{what} {job.job_id} failed: {reason}: {error.get('message', '')}"
    if reason in QUOTA_REASONS:
        return PermanentError("quota_exceeded", message + "; publish the request again later")
    return PermanentError(REASONS.get(reason, "export_failed"), message)


# --- the backend --------------------------------------------------------------------------
class BigQueryExports:
    """The BigQuery export backend (ingest's export mechanism drives it)."""

    kind = KIND

    def __init__(
        self,
        client: bigquery.Client,
        settings: BigQuerySettings,
        clock: Callable[[], float] = time.time,
        chunk_bytes: int = 8 * 1024 * 1024,
        local_url: str = "",
    ) -> None:
        self.client = client
        self.settings = settings
        # A local stand-in's URL (MLPIPE_BIGQUERY_URL): an unreachable one is named.
        self.local_url = local_url
        self.clock = clock
        self.chunk_bytes = chunk_bytes
        self.retry = DEFAULT_RETRY.with_timeout(settings.request_seconds).with_delay(
            initial=0.2, maximum=2.0
        )

    def start(
        self, request: events_pb2.IngestRequest, staging_uri: str, export_id: str
    ) -> dict[str, str]:
        """Start the export's first job (idempotently); what to record. Raise PermanentError
        for a request that cannot run, TransientError for quota and outages."""
        source = request.bigquery
        check_source(source)
        query_id, extract_id = job_ids(export_id)
        location = source.location or self.settings.location
        recorded = {
            "kind": KIND,
            "export_id": export_id,
            "staging_uri": staging_uri,
            "location": location,
            "source": describe(source),
            "query_job": query_id if source.WhichOneof("input") == "query" else "",
            "extract_job": extract_id,
            "table": "" if source.WhichOneof("input") == "query" else source.table,
            "partition": source.partition,
            "started_at": f"{self.clock():.3f}",
            "timeout_seconds": str(source.timeout_seconds or self.settings.timeout_seconds),
            # Kept for the extract a later delivery starts (_poll).
            "labels": json.dumps(job_labels(request, self.settings.env, export_id)),
        }
        try:
            if recorded["query_job"]:
                self._insert_query(source, query_id, location, json.loads(recorded["labels"]))
            else:
                self._start_extract(table_reference(source, self.settings.project), recorded)
        except (PermanentError, ExportUnavailable):
            raise
        except Exception as exc:
            raise self._classify(exc, describe(source)) from exc
        return recorded

    def _classify(self, exc: Exception, what: str) -> PermanentError | ExportUnavailable:
        """classify(), and where nothing answers at a local URL, what serves one there."""
        found = classify(exc, what)
        if self.local_url and not isinstance(exc, gexc.GoogleAPICallError):
            found = ExportUnavailable(
                found.reason,
                f"{found.message}; nothing answers at the local BigQuery {self.local_url}: the "
                "local stack serves none of its own, so serve one there (`mlpipe "
                "bigquery-standin --port PORT`, or the weather example while it runs)",
            )
        return found

    def poll(self, recorded: dict[str, str]) -> ExportStatus:
        """One look at the export: running, done (its file) or failed (why)."""
        try:
            return self._poll(recorded)
        except (PermanentError, ExportUnavailable) as exc:
            found: PermanentError | ExportUnavailable = exc
        except Exception as exc:
            found = self._classify(exc, recorded.get("source", KIND))
        if isinstance(found, ExportUnavailable):
            return ExportStatus(
                "failed", reason=found.reason, message=found.message, transient=True
            )
        return ExportStatus("failed", reason=found.reason, message=found.message)

    def exported_table(self, recorded: dict[str, str]) -> ExportedTable:
        """The exported data's schema and row count, from the table BigQuery exported."""
        table = self.client.get_table(self._source_table(recorded), retry=self.retry)
        columns: dict[str, SourceKind] = {}
        for field in table.schema:
            kind = KINDS.get(field.field_type.upper(), "nested")
            columns[field.name] = "nested" if field.mode == "REPEATED" else kind
        return ExportedTable(
            source=recorded.get("source", KIND),
            columns=columns,
            num_rows=int(table.num_rows or 0),
        )

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
        """The export mechanism's landing of a finished export: `land_export`, checked from
        the exported table's metadata and copied server-side."""
        config = load_pipeline_config(storage, request.dataset, env)
        landed, _ = land_export(
            storage,
            request,
            objects,
            self.exported_table(recorded),
            config,
            code_version=code_version,
            chunk_bytes=self.chunk_bytes,
            when=requested_at,
        )
        return landed

    def cancel(self, recorded: dict[str, str]) -> None:
        """Ask BigQuery to stop the export's jobs (best effort: a job may be done already)."""
        for job_id in (recorded.get("query_job"), recorded.get("extract_job")):
            if job_id:
                with contextlib.suppress(gexc.GoogleAPICallError):
                    self.client.cancel_job(job_id, location=recorded["location"], retry=self.retry)

    # --- steps ------------------------------------------------------------------------------
    def _insert_query(
        self,
        source: events_pb2.BigQuerySource,
        job_id: str,
        location: str,
        labels: dict[str, str],
    ) -> Any:
        try:
            return self.client.query(
                source.query,
                job_config=query_job_config(source, labels),
                job_id=job_id,
                location=location,
                project=self.settings.project,
                retry=self.retry,
                job_retry=None,
            )
        except gexc.Conflict:
            # Started by an earlier delivery: look it up, do not start it again.
            return self.client.get_job(job_id, location=location, retry=self.retry)

    def _start_extract(self, table: bigquery.TableReference, recorded: dict[str, str]) -> Any:
        meta = self.client.get_table(table, retry=self.retry)
        size = int(meta.num_bytes or 0)
        if size > self.settings.single_file_bytes:
            raise PermanentError(
                "too_large",
                f"{recorded['source']}: {size} bytes of table data, over the "
                f"{self.settings.single_file_bytes} bytes one exported file holds; narrow the "
                "dates or export one partition",
            )
        try:
            return self.client.extract_table(
                table,
                staged_uri(recorded["staging_uri"]),
                job_id=recorded["extract_job"],
                location=recorded["location"],
                project=self.settings.project,
                job_config=extract_job_config(json.loads(recorded.get("labels") or "{}")),
                retry=self.retry,
            )
        except gexc.Conflict:
            return self.client.get_job(
                recorded["extract_job"], location=recorded["location"], retry=self.retry
            )

    def _poll(self, recorded: dict[str, str]) -> ExportStatus:
        status = self._progress(recorded)
        limit = float(recorded["timeout_seconds"])
        elapsed = self.clock() - float(recorded["started_at"])
        if status.state == "running" and elapsed > limit:
            self.cancel(recorded)
            return ExportStatus(
                "failed",
                reason="export_timeout",
                message=f"{recorded['source']}: export {recorded['export_id']} not done after "
                f"{elapsed:.0f}s (limit {limit:.0f}s); its jobs were cancelled",
            )
        return status

    def _progress(self, recorded: dict[str, str]) -> ExportStatus:
        location = recorded["location"]
        if recorded["query_job"]:
            query = self.client.get_job(recorded["query_job"], location=location, retry=self.retry)
            if query.state != "DONE":
                return ExportStatus("running", message=f"query job {query.state}")
            if query.error_result:
                raise job_failure(query, "query job")
        extract = self._find(recorded["extract_job"], location)
        if extract is None:
            self._start_extract(self._source_table(recorded), recorded)
            return ExportStatus("running", message="extract job started")
        if extract.state != "DONE":
            return ExportStatus("running", message=f"extract job {extract.state}")
        if extract.error_result:
            raise job_failure(extract, "extract job")
        counts = [int(c) for c in (extract.destination_uri_file_counts or [])]
        if counts != [1]:
            raise PermanentError(
                "export_failed",
                f"extract job {extract.job_id} wrote {counts} files, not one",
            )
        return ExportStatus("done", objects=(staged_uri(recorded["staging_uri"]),))

    def _find(self, job_id: str, location: str) -> Any | None:
        try:
            return self.client.get_job(job_id, location=location, retry=self.retry)
        except gexc.NotFound:
            return None

    def _source_table(self, recorded: dict[str, str]) -> bigquery.TableReference:
        if recorded["query_job"]:
            job = self.client.get_job(
                recorded["query_job"], location=recorded["location"], retry=self.retry
            )
            if not isinstance(job, bigquery.QueryJob) or job.destination is None:
                raise PermanentError(
                    "export_failed", f"job {recorded['query_job']} is not a query with a result"
                )
            return job.destination
        table = recorded["table"] + (f"${recorded['partition']}" if recorded["partition"] else "")
        return bigquery.TableReference.from_string(table, default_project=self.settings.project)


# --- landing ------------------------------------------------------------------------------
def stream_sha256(
    storage: Storage, path: str, generation: int, size: int, chunk_bytes: int
) -> StreamedDigest:
    """The object's sha256 from ranged reads of at most `chunk_bytes`: memory stays bounded
    whatever the object's size; every read is pinned to `generation`."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    digest = hashlib.sha256()
    blob = storage.bucket.blob(path, generation=generation)
    chunks = largest = 0
    for start in range(0, size, chunk_bytes):
        end = min(start + chunk_bytes, size) - 1
        data = blob.download_as_bytes(start=start, end=end, if_generation_match=generation)
        digest.update(data)
        chunks += 1
        largest = max(largest, len(data))
    return StreamedDigest(digest.hexdigest(), size, chunks, largest)


def land_export(
    storage: Storage,
    request: events_pb2.IngestRequest,
    objects: tuple[str, ...],
    table: ExportedTable,
    config: PipelineConfig,
    *,
    code_version: str,
    chunk_bytes: int,
    when: dt.datetime | None = None,
) -> tuple[events_pb2.DatasetLanded, StreamedDigest]:
    """Check an export's table against the pipeline's `dataset:` contract, then copy its one
    Parquet file (server-side, create-if-absent) to where its content names it. Raise a
    PermanentError naming the first problem; nothing lands then."""
    when = when or (
        request.requested_at.ToDatetime(dt.UTC)
        if request.HasField("requested_at")
        else dt.datetime.now(dt.UTC)
    )
    ctx = events.context(
        producer="ingest",
        code_version=code_version,
        pipeline=config.name,
        config_sha256=config.sha256(),
        request_id=request.request_id,
    )
    ctx.requested_at.CopyFrom(events.timestamp(when))
    try:
        if len(objects) != 1:
            raise PermanentError(
                "export_failed", f"{table.source}: {len(objects)} exported files, not one"
            )
        check_schema(table.columns, table.num_rows, config, table.source)
        staged_path = storage.path_of(objects[0])
        staged = storage.bucket.get_blob(staged_path)
        if staged is None:
            raise PermanentError("export_failed", f"{table.source}: {objects[0]} does not exist")
    except PermanentError as exc:
        exc.context = ctx
        raise
    generation, size = int(staged.generation or 0), int(staged.size or 0)
    digest = stream_sha256(storage, staged_path, generation, size, chunk_bytes)
    header = list(table.columns)
    path = layout.dataset_path(config.name, when.date(), digest.sha256[:16], "parquet")
    metadata = {
        "sha256": digest.sha256,
        "source": table.source[:1000],
        "row_count": str(table.num_rows),
        "columns": ",".join(header),
        "schema": describe_schema(schema_of(config, header)),
        "request_id": request.request_id,
        "requested_at": when.isoformat(),
    }
    landed_generation, already, landed_at = _copy_once(
        storage, staged_path, generation, path, metadata
    )
    ctx.run_id = layout.run_id_for(digest.sha256, ctx.config_sha256)
    landed = events_pb2.DatasetLanded(
        context=ctx,
        dataset=events_pb2.DatasetRef(
            uri=storage.uri(path),
            generation=landed_generation,
            sha256=digest.sha256,
            name=config.name,
            row_count=table.num_rows,
            data_format=events.DATA_FORMAT.of("parquet"),
            landed_at=events.timestamp(landed_at),
        ),
        already_present=already,
        columns=header,
    )
    return landed, digest


def _copy_once(
    storage: Storage, source: str, generation: int, path: str, metadata: dict[str, str]
) -> tuple[int, bool, dt.datetime]:
    """GCS rewrites the staged object to `path` unless `path` exists: (its generation,
    whether it was there already, when it landed)."""
    # The name is the content's hash, so an object already there is this content. Looking
    # first saves a rewrite; the precondition below is what decides between two concurrent
    # landings on GCS (fake-gcs-server ignores ifGenerationMatch on rewrite and copy: checked).
    existing = storage.bucket.get_blob(path)
    if existing is not None:
        return int(existing.generation), True, existing.time_created or dt.datetime.now(dt.UTC)
    target = storage.bucket.blob(path)
    target.metadata = metadata
    target.content_type = PARQUET_TYPE
    staged = storage.bucket.blob(source, generation=generation)
    try:
        token, _, _ = target.rewrite(staged, if_generation_match=0)
        while token is not None:
            token, _, _ = target.rewrite(staged, token=token, if_generation_match=0)
    except gexc.PreconditionFailed:
        existing = storage.bucket.get_blob(path)
        if existing is None:
            return 0, True, dt.datetime.now(dt.UTC)
        return int(existing.generation), True, existing.time_created or dt.datetime.now(dt.UTC)
    return int(target.generation or 0), False, dt.datetime.now(dt.UTC)
