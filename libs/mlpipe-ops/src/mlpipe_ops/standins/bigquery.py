"""A local BigQuery API v2: query and extract jobs over a small catalogue of tables.

The real `google-cloud-bigquery` client drives it over REST (`client_options={"api_endpoint":
stand_in.url}`, anonymous credentials):
- jobs.insert (a query or an extract job), jobs.get, jobs.cancel, jobs.getQueryResults;
- tables.get and datasets.get for the catalogue's tables and the jobs' result tables.

Queries run on a real SQL engine (DuckDB) after the table names and the `@name` parameters are
mapped to it; what DuckDB cannot run is refused as BigQuery refuses a query (`invalidQuery`),
never guessed at. An extract job writes Parquet into Cloud Storage (the GCS emulator) through
the storage client it is given. Jobs are PENDING, then RUNNING, then DONE `job_seconds` after
they were inserted, on a clock the caller may move (`advance`). Quota refusals of jobs.insert
can be scripted (`refuse_inserts`).

Every rule and its source are listed in docs/bigquery-standin.md; the comments name the rule.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from google.cloud import storage as gcs

from mlpipe_ops.standins.google_api import (
    close,
    dumps,
    label_problem,
    read_body,
    send_json,
    serve,
)

HOST = "127.0.0.1"
PUBLIC = "bigquery-public-data"
GSOD = f"{PUBLIC}.noaa_gsod.gsod2026"
# Rule 1: the REST surface under /bigquery/v2.
PATH = re.compile(
    r"^/bigquery/v2/projects/(?P<project>[^/]+)"
    r"(?:/(?P<kind>jobs|queries|datasets)(?:/(?P<id>[^/]+))?"
    r"(?:/(?P<sub>tables|cancel)(?:/(?P<table>[^/]+))?)?)?$"
)
# Rule 5: a job id is letters, digits, underscores and dashes, at most 1024 characters.
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,1024}$")
# Rule 13: one file holds at most 1 GB of logical data.
SINGLE_FILE_BYTES = 1_000_000_000
BACKTICKED = re.compile(r"`([^`]+)`")
# An unquoted dataset.table or project.dataset.table after FROM or JOIN.
UNQUOTED_TABLE = re.compile(
    r"(?i)\b(from|join)(\s+)([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*){1,2})\b(?!\s*\()"
)
PARAM = re.compile(r"@([A-Za-z_][A-Za-z0-9_]*)")
ARROW_TYPES = {
    "STRING": pa.string(),
    "INTEGER": pa.int64(),
    "FLOAT": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "DATE": pa.date32(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
}


class BigQueryError(Exception):
    """A refused request: HTTP status, the ErrorProto reason and a message (rule 3)."""

    def __init__(self, http_status: int, reason: str, message: str, location: str = "") -> None:
        super().__init__(message)
        self.http_status = http_status
        self.reason = reason
        self.message = message
        self.location = location

    def proto(self) -> dict[str, str]:
        out = {"reason": self.reason, "message": self.message}
        if self.location:
            out["location"] = self.location
        return out

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.http_status,
                "message": self.message,
                "errors": [{**self.proto(), "domain": "global"}],
                "status": STATUS.get(self.http_status, "UNKNOWN"),
            }
        }


STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
}


def not_found(kind: str, name: str) -> BigQueryError:
    # Rule 9.
    return BigQueryError(404, "notFound", f"Not found: {kind} {name}")


def invalid_query(message: str) -> BigQueryError:
    # Rule 10.
    return BigQueryError(400, "invalidQuery", message, location="query")


@dataclass
class Table:
    project: str
    dataset: str
    table: str
    data: pa.Table
    location: str = "US"
    partition_field: str = ""  # a DATE column the table is partitioned by, by day

    @property
    def full_id(self) -> str:
        return f"{self.project}.{self.dataset}.{self.table}"

    def num_bytes(self) -> int:
        # Rule 13: logical bytes; Arrow's buffer size stands in for BigQuery's accounting.
        return int(self.data.nbytes)

    def resource(self, decorator: str = "") -> dict[str, Any]:
        data = self.partition(decorator) if decorator else self.data
        out: dict[str, Any] = {
            "kind": "bigquery#table",
            "id": f"{self.project}:{self.dataset}.{self.table}",
            "tableReference": {
                "projectId": self.project,
                "datasetId": self.dataset,
                "tableId": self.table + (f"${decorator}" if decorator else ""),
            },
            "type": "TABLE",
            "location": self.location,
            "schema": {"fields": schema_fields(data.schema)},
            "numRows": str(data.num_rows),
            "numBytes": str(int(data.nbytes)),
        }
        if self.partition_field:
            out["timePartitioning"] = {"type": "DAY", "field": self.partition_field}
        return out

    def partition(self, decorator: str) -> pa.Table:
        """Rule 12: `table$YYYYMMDD` is one day of a day-partitioned table."""
        if not self.partition_field or not re.fullmatch(r"\d{8}", decorator):
            raise BigQueryError(
                400, "invalid", f"Invalid partition decorator ${decorator} for {self.full_id}"
            )
        try:
            day = dt.datetime.strptime(decorator, "%Y%m%d").date()
        except ValueError:
            raise BigQueryError(400, "invalid", f"Invalid partition ${decorator}") from None
        column = self.data.column(self.partition_field).to_pylist()
        return self.data.filter(pa.array([v == day for v in column]))


def bq_type(arrow: pa.DataType) -> str:
    """Rule 11: the BigQuery type of a result column."""
    if pa.types.is_integer(arrow):
        return "INTEGER"
    if pa.types.is_floating(arrow) or pa.types.is_decimal(arrow):
        return "FLOAT"
    if pa.types.is_boolean(arrow):
        return "BOOLEAN"
    if pa.types.is_date(arrow):
        return "DATE"
    if pa.types.is_timestamp(arrow):
        return "TIMESTAMP"
    return "STRING"


def schema_fields(schema: pa.Schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": bq_type(f.type), "mode": "NULLABLE"} for f in schema]


def gsod(stations: int = 12, days: int = 90, seed: int = 0) -> pa.Table:
    """A synthetic daily weather history shaped like NOAA GSOD (one row per station and day):
    deterministic for a seed. Temperatures in °F as GSOD keeps them, with a seasonal swing."""
    rng = random.Random(seed)
    start = dt.date(2026, 1, 1)
    rows: dict[str, list[Any]] = {
        k: [] for k in ("stn", "name", "date", "temp", "dewp", "slp", "wdsp", "prcp", "max", "min")
    }
    for s in range(stations):
        base = rng.uniform(35, 60)
        for d in range(days):
            day = start + dt.timedelta(days=d)
            season = 15 * math.sin((d - 100) / 365 * 2 * math.pi)
            temp = base + season + rng.gauss(0, 3)
            rows["stn"].append(f"{720000 + s * 17:06d}")
            rows["name"].append(f"STATION {s:02d}")
            rows["date"].append(day)
            rows["temp"].append(round(temp, 1))
            rows["dewp"].append(round(temp - rng.uniform(2, 15), 1))
            rows["slp"].append(round(rng.uniform(995, 1030), 1))
            rows["wdsp"].append(round(rng.uniform(0, 20), 1))
            rows["prcp"].append(round(max(0.0, rng.gauss(0.05, 0.2)), 2))
            rows["max"].append(round(temp + rng.uniform(3, 12), 1))
            rows["min"].append(round(temp - rng.uniform(3, 12), 1))
    types = {"stn": pa.string(), "name": pa.string(), "date": pa.date32()}
    return pa.table({k: pa.array(v, type=types.get(k, pa.float64())) for k, v in rows.items()})


@dataclass
class Job:
    project: str
    job_id: str
    location: str
    kind: str  # "query" | "extract"
    configuration: dict[str, Any]
    inserted: float
    due: float
    created: str
    result: Table | None = None  # a query's destination table
    error: BigQueryError | None = None
    cancelled: bool = False
    files: list[str] = field(default_factory=list)
    finished: bool = False


class BigQueryStandIn:
    """The stand-in: `start()` serves it on 127.0.0.1 in a thread, `stop()` ends it."""

    def __init__(
        self,
        project_id: str,
        storage_client: gcs.Client,
        *,
        port: int = 0,
        job_seconds: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        catalogue: list[Table] | None = None,
        single_file_bytes: int = SINGLE_FILE_BYTES,
    ) -> None:
        self.project_id = project_id
        self.single_file_bytes = single_file_bytes
        self.storage = storage_client
        self.port = port
        self.job_seconds = job_seconds
        self._clock = clock
        self._offset = 0.0
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self.tables: dict[str, Table] = {}
        for table in catalogue or [Table(PUBLIC, "noaa_gsod", "gsod2026", gsod(), "US", "date")]:
            self.add_table(table)
        self.jobs: dict[tuple[str, str], Job] = {}
        # Every jobs.insert that created a job: (kind, job id). Tests count them.
        self.inserted: list[tuple[str, str]] = []
        self._refusals: list[str] = []
        # Every request answered: (method, path). Tests read which endpoints a client used.
        self.calls: list[tuple[str, str]] = []

    # --- life cycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client_options(self) -> dict[str, str]:
        return {"api_endpoint": self.url}

    def start(self) -> BigQueryStandIn:
        self._server = serve(_handler(self), self.port, "bigquery")
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        close(self._server)
        self._server = None

    def __enter__(self) -> BigQueryStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def now(self) -> float:
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the clock on: jobs due by then are DONE at the next request (rule 7)."""
        self._offset += seconds

    def add_table(self, table: Table) -> None:
        self.tables[table.full_id] = table

    def refuse_inserts(self, count: int, reason: str = "rateLimitExceeded") -> None:
        """The next `count` jobs.insert calls are refused with 403 `reason` (rule 14)."""
        if reason not in ("rateLimitExceeded", "quotaExceeded"):
            raise ValueError(f"not a quota reason: {reason}")
        self._refusals += [reason] * count

    # --- requests ----------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        with self._lock:
            self.calls.append((method, path))
            # Rule 7: a job finishes when it is due, whether or not anyone asks about it.
            for job in list(self.jobs.values()):
                self._progress(job)
            match = PATH.match(path)
            if not match:
                raise BigQueryError(404, "notFound", f"the stand-in does not serve {path}")
            # Rule 2: any project may run jobs (no IAM here).
            project, kind, rid = match["project"], match["kind"], match["id"]
            sub, table = match["sub"], match["table"]
            location = query.get("location", [""])[0]
            if kind == "jobs" and rid is None and method == "POST":
                return self._insert(project, body or {})
            if kind == "jobs" and rid and sub == "cancel" and method == "POST":
                job = self._job(project, rid, location)
                job.cancelled = True
                return {"kind": "bigquery#jobCancelResponse", "job": self._job_json(job)}
            if kind == "jobs" and rid and sub is None and method == "GET":
                return self._job_json(self._job(project, rid, location))
            if kind == "queries" and rid and method == "GET":
                return self._query_results(self._job(project, rid, location), query)
            if kind == "datasets" and rid and method == "GET":
                return self._dataset(project, rid, sub, table)
            raise BigQueryError(400, "invalid", f"{method} {path} is not served by the stand-in")

    def _dataset(self, project: str, dataset: str, sub: str | None, table: str | None) -> Any:
        if sub is None:
            results = [j.result for j in self.jobs.values() if j.result is not None and j.finished]
            known = {(t.project, t.dataset): t.location for t in [*self.tables.values(), *results]}
            if (project, dataset) not in known:
                raise not_found("Dataset", f"{project}:{dataset}")
            return {
                "kind": "bigquery#dataset",
                "datasetReference": {"projectId": project, "datasetId": dataset},
                "location": known[(project, dataset)],
            }
        if sub != "tables" or not table:
            raise BigQueryError(400, "invalid", "tables.list is not served by the stand-in")
        name, _, decorator = table.partition("$")
        full = f"{project}.{dataset}.{name}"
        found = self.tables.get(full) or self._result_table(full)
        if found is None:
            raise not_found("Table", f"{project}:{dataset}.{table}")
        return found.resource(decorator)

    def _job(self, project: str, job_id: str, location: str) -> Job:
        job = self.jobs.get((project, job_id))
        if job is None or (location and location.lower() != job.location.lower()):
            # Rule 6: a job is found in its own location only.
            raise not_found("Job", f"{project}:{location or 'US'}.{job_id}")
        self._progress(job)
        return job

    def _insert(self, project: str, body: dict[str, Any]) -> Any:
        if self._refusals:
            reason = self._refusals.pop(0)
            # Rule 14: quota and rate limits refuse the request with 403.
            what = "Exceeded rate limits" if reason == "rateLimitExceeded" else "Quota exceeded"
            raise BigQueryError(403, reason, f"{what}: too many jobs for project {project}")
        ref = body.get("jobReference") or {}
        job_id = ref.get("jobId") or f"job_{random.getrandbits(64):016x}"
        if not JOB_ID.match(job_id):
            raise BigQueryError(400, "invalid", f"Invalid job ID {job_id!r}")  # Rule 5
        location = ref.get("location") or "US"
        if (project, job_id) in self.jobs:
            # Rule 4: a job id is used once in a project.
            raise BigQueryError(
                409, "duplicate", f"Already Exists: Job {project}:{location}.{job_id}"
            )
        config = body.get("configuration") or {}
        problem = label_problem(config.get("labels"))
        if problem:
            # Rule 20: a job's labels follow Google's label rules.
            raise BigQueryError(400, "invalid", f"configuration.labels: {problem}")
        kind = "query" if "query" in config else "extract" if "extract" in config else ""
        if not kind:
            raise BigQueryError(400, "invalid", "the stand-in runs query and extract jobs only")
        now = self.now()
        job = Job(project, job_id, location, kind, config, now, now + self.job_seconds, _ms(now))
        try:
            if kind == "query":
                self._run_query(job)
            else:
                self._check_extract(job)
        except BigQueryError as exc:
            # Rule 8: what goes wrong while a job runs is its status.errorResult.
            job.error = exc
        self.jobs[(project, job_id)] = job
        self.inserted.append((kind, job_id))
        return self._job_json(job)

    # --- queries -----------------------------------------------------------------------------
    def _run_query(self, job: Job) -> None:
        spec = job.configuration["query"]
        if spec.get("useLegacySql", True) is not False:
            # Rule 10: the stand-in speaks standard SQL only (the client sends false).
            raise invalid_query("the stand-in runs standard SQL only (useLegacySql: false)")
        sql = str(spec.get("query", "")).strip().rstrip(";")
        if not re.match(r"^(select|with)\b", sql, re.IGNORECASE):
            raise invalid_query(f"only SELECT queries are run here, not: {sql[:40]!r}")
        connection = duckdb.connect(":memory:")
        try:
            names: dict[str, str] = {}

            def table_name(ref: str) -> str:
                parts = ref.split(".")
                full = ".".join([job.project, *parts]) if len(parts) == 2 else ref
                table = self.tables.get(full)
                if table is None:
                    raise not_found("Table", full.replace(".", ":", 1))
                if table.location.lower() != job.location.lower():
                    # Rule 6: a query runs where its tables are.
                    raise not_found(
                        "Table",
                        f"{full.replace('.', ':', 1)} was not found in location {job.location}",
                    )
                local = names.setdefault(full, f"t{len(names)}")
                connection.register(local, table.data)
                return local

            def quoted(m: re.Match[str]) -> str:
                # A dotted name is a table; anything else is a quoted identifier (a column).
                inner = m.group(1)
                return table_name(inner) if "." in inner else '"' + inner.replace('"', '""') + '"'

            translated = BACKTICKED.sub(quoted, sql)
            translated = UNQUOTED_TABLE.sub(
                lambda m: m.group(1) + m.group(2) + table_name(m.group(3)), translated
            )
            params = self._parameters(spec.get("queryParameters") or [])
            missing = sorted(set(PARAM.findall(translated)) - set(params))
            if missing:
                raise invalid_query(f"Query parameter '{missing[0]}' not found")
            translated = PARAM.sub(lambda m: f"${m.group(1)}", translated)
            try:
                used = {k: v for k, v in params.items() if f"${k}" in translated}
                result = connection.sql(translated, params=used).to_arrow_table()
            except duckdb.CatalogException as exc:
                raise invalid_query(_first_line(exc)) from None
            except duckdb.Error as exc:
                raise invalid_query(_first_line(exc)) from None
        finally:
            connection.close()
        dest = spec.get("destinationTable")
        if dest:
            project, dataset, table = dest["projectId"], dest["datasetId"], dest["tableId"]
        else:
            # Rule 15: results without a destination go to an anonymous table.
            digest = hashlib.sha256(f"{job.project}:{job.job_id}".encode()).hexdigest()
            project, dataset, table = job.project, f"_{digest[:40]}", f"anon{digest[40:]}"
        job.result = Table(project, dataset, table, _normalise(result), job.location)
        spec["destinationTable"] = {"projectId": project, "datasetId": dataset, "tableId": table}

    @staticmethod
    def _parameters(parameters: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in parameters:
            name = p.get("name", "")
            kind = p.get("parameterType", {}).get("type", "STRING")
            raw = p.get("parameterValue", {}).get("value")
            try:
                if raw is None:
                    out[name] = None
                elif kind == "DATE":
                    out[name] = dt.date.fromisoformat(raw)
                elif kind in ("INT64", "INTEGER"):
                    out[name] = int(raw)
                elif kind in ("FLOAT64", "FLOAT", "NUMERIC"):
                    out[name] = float(raw)
                else:
                    out[name] = str(raw)
            except ValueError:
                raise invalid_query(f"Invalid {kind} value {raw!r} for parameter {name}") from None
        return out

    def _query_results(self, job: Job, query: dict[str, list[str]]) -> Any:
        if not job.finished:
            return {
                "kind": "bigquery#getQueryResultsResponse",
                "jobReference": self._ref(job),
                "jobComplete": False,
            }
        if job.error is not None:
            raise BigQueryError(job.error.http_status, job.error.reason, job.error.message)
        data = job.result.data if job.result else pa.table({})
        # Rule 18: completion, schema and row count; rows are not served (ingest exports them),
        # and a caller asking for them is refused rather than told there are none.
        if query.get("maxResults", [""])[0] != "0" and data.num_rows:
            raise BigQueryError(
                400, "invalid", "the stand-in serves no result rows: export them (extract job)"
            )
        return {
            "kind": "bigquery#getQueryResultsResponse",
            "jobReference": self._ref(job),
            "jobComplete": True,
            "schema": {"fields": schema_fields(data.schema)},
            "totalRows": str(data.num_rows),
        }

    # --- extracts ----------------------------------------------------------------------------
    def _source(self, job: Job) -> tuple[Table, pa.Table]:
        ref = job.configuration["extract"].get("sourceTable") or {}
        name, _, decorator = str(ref.get("tableId", "")).partition("$")
        full = f"{ref.get('projectId')}.{ref.get('datasetId')}.{name}"
        table = self.tables.get(full) or self._result_table(full)
        if table is None:
            raise not_found("Table", full.replace(".", ":", 1))
        return table, (table.partition(decorator) if decorator else table.data)

    def _result_table(self, full: str) -> Table | None:
        for job in self.jobs.values():
            if job.result is not None and job.result.full_id == full and job.finished:
                return job.result
        return None

    def _check_extract(self, job: Job) -> None:
        spec = job.configuration["extract"]
        table, data = self._source(job)
        uris = spec.get("destinationUris") or []
        if len(uris) != 1 or not str(uris[0]).startswith("gs://"):
            raise BigQueryError(400, "invalid", "one gs:// destination URI is run here")
        fmt = spec.get("destinationFormat", "CSV")
        if fmt != "PARQUET":
            # Rule 19.
            raise BigQueryError(400, "invalid", f"the stand-in exports PARQUET only, not {fmt}")
        if "*" not in uris[0] and int(data.nbytes) > self.single_file_bytes:
            # Rule 13.
            raise BigQueryError(
                400,
                "invalid",
                f"Table {table.full_id} too large to be exported to a single file. Specify a "
                "uri including a * to shard export.",
            )

    def _write_extract(self, job: Job) -> None:
        spec = job.configuration["extract"]
        _table, data = self._source(job)
        uri = spec["destinationUris"][0]
        bucket, _, name = uri[len("gs://") :].partition("/")
        shards = [data]
        if "*" in name:
            # Rule 13: a wildcard URI is filled with numbered shards (two here when the data
            # has two rows or more, to exercise readers of shards).
            half = data.num_rows // 2
            shards = [data.slice(0, half), data.slice(half)] if half else [data]
        for i, shard in enumerate(shards):
            object_name = name.replace("*", f"{i:012d}", 1)
            sink = io.BytesIO()
            pq.write_table(shard, sink)
            self.storage.bucket(bucket).blob(object_name).upload_from_string(
                sink.getvalue(), content_type="application/octet-stream"
            )
            job.files.append(f"gs://{bucket}/{object_name}")

    # --- job states --------------------------------------------------------------------------
    def _progress(self, job: Job) -> None:
        if job.finished or (self.now() < job.due and not job.cancelled):
            return
        job.finished = True
        if job.cancelled and job.error is None:
            # Rule 16: a cancelled job ends DONE with errorResult "stopped".
            job.error = BigQueryError(
                200, "stopped", "Job execution was cancelled: User requested cancellation"
            )
            return
        if job.kind == "extract" and job.error is None:
            try:
                self._write_extract(job)
            except BigQueryError as exc:
                job.error = exc

    def _state(self, job: Job) -> str:
        # Rule 7: PENDING, then RUNNING, then DONE.
        if job.finished:
            return "DONE"
        return "PENDING" if self.now() < job.inserted + (job.due - job.inserted) / 4 else "RUNNING"

    def _ref(self, job: Job) -> dict[str, str]:
        return {"projectId": job.project, "jobId": job.job_id, "location": job.location}

    def _job_json(self, job: Job) -> dict[str, Any]:
        state = self._state(job)
        status: dict[str, Any] = {"state": state}
        statistics: dict[str, Any] = {"creationTime": job.created}
        if state != "PENDING":
            statistics["startTime"] = job.created
        if state == "DONE":
            statistics["endTime"] = _ms(job.due)
            if job.error is not None:
                status["errorResult"] = job.error.proto()
                status["errors"] = [job.error.proto()]
            elif job.kind == "query" and job.result is not None:
                statistics["query"] = {
                    "totalBytesProcessed": str(job.result.num_bytes()),
                    "statementType": "SELECT",
                }
            elif job.kind == "extract":
                # Rule 17: the file count per destination URI.
                statistics["extract"] = {"destinationUriFileCounts": [str(len(job.files))]}
        return {
            "kind": "bigquery#job",
            "id": f"{job.project}:{job.location}.{job.job_id}",
            "jobReference": self._ref(job),
            "configuration": {**job.configuration, "jobType": job.kind.upper()},
            "status": status,
            "statistics": statistics,
        }


def _normalise(data: pa.Table) -> pa.Table:
    """Result columns as the types BigQuery would give them (rule 11)."""
    columns = []
    for column in data.columns:
        target = ARROW_TYPES[bq_type(column.type)]
        columns.append(column.cast(target) if column.type != target else column)
    return pa.table(columns, names=data.column_names)


def _ms(seconds: float) -> str:
    """Job statistics times are milliseconds since the epoch, as strings (rule 7); the
    stand-in's clock is moved onto wall time for them."""
    return str(int((time.time() + seconds - time.monotonic()) * 1000))


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:500]


def _handler(stand_in: BigQueryStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            raw = read_body(self)
            url = urlsplit(self.path)
            try:
                body = json.loads(raw) if raw else None
                answer = stand_in.handle(self.command, url.path, parse_qs(url.query), body)
                status, data = 200, dumps(answer)
            except BigQueryError as exc:
                status, data = exc.http_status, dumps(exc.body())
            except json.JSONDecodeError as exc:
                error = BigQueryError(400, "parseError", f"Invalid JSON payload. {exc}")
                status, data = error.http_status, dumps(error.body())
            send_json(self, status, data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        def log_message(self, *args: object) -> None:
            pass

    return Handler
