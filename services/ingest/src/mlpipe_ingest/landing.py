"""Ingest's step: turn an IngestRequest into a validated dataset object in the landing bucket.

The object name is derived from the content (`<sha256[:16]>.<ext>`) and created with
`if_generation_match=0`, so a redelivered or repeated request lands nothing twice.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage
from mlpipe.ml.config import PipelineConfig, load_pipeline_config
from mlpipe.ml.validation import check_frame, describe_schema, schema_of
from mlpipe.runtime.errors import PermanentError
from mlpipe.runtime.faults import fault_point
from mlpipe.runtime.service import StepResult, decode_message
from mlpipe.store import layout
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2

if TYPE_CHECKING:
    from mlpipe_ingest.sources import SourceSettings

log = logging.getLogger(__name__)


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Landing:
    storage: Storage
    publisher: Publisher
    code_version: str
    max_inline_bytes: int
    env: str = "local"
    sources: SourceSettings | None = None

    def __call__(self, message: PushMessage) -> StepResult:
        return land(message, self)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):  # JSON from an http or gcs source (Struct values are floats)
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value
    raise PermanentError("wrong_type", f"value {value!r} is a {type(value).__name__}, not a scalar")


def table_from_csv(text: str) -> Table:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise PermanentError("empty_dataset", "inline CSV is empty") from None
    except csv.Error as exc:
        raise PermanentError("malformed_csv", f"inline CSV header is unreadable: {exc}") from exc
    header = [h.strip() for h in header]
    if not any(header):
        raise PermanentError("malformed_csv", "inline CSV has an empty header line")
    if len(set(header)) != len(header):
        raise PermanentError("malformed_csv", f"inline CSV header repeats a column: {header}")
    rows: list[list[str]] = []
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise PermanentError(
                    "malformed_csv",
                    f"inline CSV line {reader.line_num} has {len(row)} fields; "
                    f"the header has {len(header)}",
                )
            rows.append([c.strip() for c in row])
    except csv.Error as exc:
        raise PermanentError(
            "malformed_csv", f"inline CSV line {reader.line_num} is unreadable: {exc}"
        ) from exc
    return Table(header, rows)


def table_from_records(records: list[dict[str, Any]]) -> Table:
    header: list[str] = []
    for record in records:
        for key in record:
            if key not in header:
                header.append(key)
    rows = [[_cell(r.get(k)) for k in header] for r in records]
    return Table(header, rows)


def to_csv_bytes(table: Table) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.header)
    writer.writerows(table.rows)
    return out.getvalue().encode()


def to_parquet_bytes(table: Table) -> bytes:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    arrow = pacsv.read_csv(io.BytesIO(to_csv_bytes(table)))
    out = io.BytesIO()
    pq.write_table(arrow, out)
    return out.getvalue()


def validate(table: Table, config: PipelineConfig) -> None:
    if not table.rows:
        raise PermanentError("empty_dataset", "the request has a header but no rows")
    target = config.dataset.target
    features = config.feature_columns(table.header)
    missing = [c for c in [target, *features] if c not in table.header]
    if missing:
        raise PermanentError(
            "missing_column",
            f"column(s) {missing} required by pipeline {config.name!r} are missing "
            f"(got {table.header})",
        )
    n = len(table.rows)
    if not config.dataset.min_rows <= n <= config.dataset.max_rows:
        raise PermanentError(
            "row_count",
            f"{n} rows; pipeline {config.name!r} accepts "
            f"{config.dataset.min_rows}..{config.dataset.max_rows}",
        )
    t = table.header.index(target)
    # Data rows counted from 1, as they land (blank input lines are dropped first).
    empty = [i + 1 for i, row in enumerate(table.rows) if not row[t]]
    if empty:
        raise PermanentError(
            "null_target", f"{len(empty)} row(s) have no {target!r} (data rows {empty[:10]})"
        )


def land(message: PushMessage, deps: Landing) -> StepResult:
    if len(message.data) > deps.max_inline_bytes:
        raise PermanentError(
            "payload_too_large",
            f"request is {len(message.data)} bytes, over the inline limit of "
            f"{deps.max_inline_bytes}; upload the file to "
            f"{deps.storage.uri('datasets/<name>/dt=YYYY-MM-DD/')} instead",
        )
    request = decode_message(events_pb2.IngestRequest, message)
    if not request.dataset:
        raise PermanentError("invalid_message", "IngestRequest.dataset is empty")
    config = load_pipeline_config(deps.storage, request.dataset, deps.env)
    ctx = events.context(
        producer="ingest",
        code_version=deps.code_version,
        pipeline=config.name,
        config_sha256=config.sha256(),
        request_id=request.request_id,
    )

    # sources.py builds on this module's Table and parsers, hence the late import.
    from mlpipe_ingest.sources import SourceSettings, table_from_request

    try:
        table, source = table_from_request(
            request,
            message,
            deps.storage.client,
            deps.sources or SourceSettings.default(deps.storage.bucket_name),
        )
    except PermanentError as exc:
        # Inline rows that cannot be parsed are reported as before, traced by the message's
        # request_id attribute; a fetched source's failure carries the run context.
        if request.WhichOneof("source") != "inline":
            exc.context = ctx
        raise
    try:
        validate(table, config)
        check_frame(pd.DataFrame(table.rows, columns=table.header, dtype=str), config, source)
    except PermanentError as exc:
        exc.context = ctx
        if not exc.message.startswith(source):
            exc.message = f"{source}: {exc.message}"
            exc.args = (exc.message,)
        raise

    parquet = request.format == events_pb2.DATA_FORMAT_PARQUET
    data = to_parquet_bytes(table) if parquet else to_csv_bytes(table)
    ext = "parquet" if parquet else "csv"
    sha = sha256_hex(data)
    when = (
        request.requested_at.ToDatetime(dt.UTC)
        if request.HasField("requested_at")
        else message.publish_time
    )
    ctx.requested_at.CopyFrom(events.timestamp(when))
    path = layout.dataset_path(config.name, when.date(), sha[:16], ext)
    metadata = {
        "sha256": sha,
        "source": source[:1000],
        "row_count": str(len(table.rows)),
        "columns": ",".join(table.header),
        "schema": describe_schema(schema_of(config, table.header)),
        "request_id": request.request_id,
        "requested_at": when.isoformat(),
    }
    generation = deps.storage.create_if_absent(
        path,
        data,
        content_type="text/csv" if ext == "csv" else "application/vnd.apache.parquet",
        metadata=metadata,
    )
    already = generation is None
    landed_at = dt.datetime.now(dt.UTC)
    if generation is None:
        existing = deps.storage.bucket.get_blob(path)
        generation = int(existing.generation) if existing is not None else 0
        if existing is not None and existing.time_created is not None:
            landed_at = existing.time_created
    fault_point("ingest.after_land")
    ctx.run_id = layout.run_id_for(sha, ctx.config_sha256)
    landed = events_pb2.DatasetLanded(
        context=ctx,
        dataset=events_pb2.DatasetRef(
            uri=deps.storage.uri(path),
            generation=generation,
            sha256=sha,
            name=config.name,
            row_count=len(table.rows),
            format=ext,
            landed_at=events.timestamp(landed_at),
        ),
        already_present=already,
        columns=table.header,
    )
    deps.publisher.publish(landed)
    log.info(
        "landed %s (%d rows)%s",
        landed.dataset.uri,
        len(table.rows),
        " — identical content was already there" if already else "",
        extra={"run_id": ctx.run_id},
    )
    return StepResult(
        "landed" if not already else "duplicate",
        {"dataset_uri": landed.dataset.uri},
        run_id=ctx.run_id,
    )
