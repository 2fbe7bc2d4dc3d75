"""Reading an IngestRequest's rows from its source: inline, HTTP(S) URLs, or a GCS object.

Every source ends as one `Table` of strings that is then validated and landed the same way.
A source that cannot be read raises a PermanentError whose reason says why and whose message
names the source. HTTP 5xx, timeouts and refused connections are retried within the delivery
(bounded, with backoff); if they persist, ingest answers 503 so Pub/Sub redelivers later,
until `retry_deliveries` deliveries have failed: then the request is failed permanently
(reported and quarantined) instead of going silently to the dead-letter topic.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import storage as gcs

from mlpipe.errors import PermanentError, TransientError
from mlpipe.messaging import events
from mlpipe.messaging.push import PushMessage
from mlpipe.ml.data import decode_text
from mlpipe.store.storage import parse_gs_uri
from mlpipe.v1 import events_pb2
from mlpipe_ingest.sources_http import (
    FetchError,
    HttpLimits,
    check_content_type,
    fetch,
    parse_json,
    parse_json_lines,
)
from mlpipe_ingest.table import Table, table_from_csv, table_from_records

CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class SourceSettings:
    http: HttpLimits
    allowed_buckets: tuple[str, ...]
    max_object_bytes: int
    retry_deliveries: int

    @classmethod
    def default(cls, bucket: str) -> SourceSettings:
        return cls(HttpLimits(), (bucket,), 100 * 1024 * 1024, 5)


def _permanent(exc: FetchError, kind: str) -> PermanentError:
    return PermanentError(exc.reason, f"{kind} source: {exc.message}")


def _fail(exc: FetchError, kind: str, message: PushMessage, settings: SourceSettings) -> Exception:
    """A retryable fetch error is transient until the delivery budget is spent.

    Without a delivery count (no dead-letter policy on the subscription) there is no way to
    bound Pub/Sub's retries, so it is permanent at once.
    """
    attempt = message.delivery_attempt
    if exc.retryable and 0 < attempt < settings.retry_deliveries:
        return TransientError(f"{kind} source (delivery {attempt}): {exc.message}")
    return _permanent(exc, kind)


def _merge(tables: list[Table], source: str) -> Table:
    """Concatenate tables: the union of columns in first-seen order, missing cells empty."""
    header: list[str] = []
    for table in tables:
        header += [c for c in table.header if c not in header]
    rows: list[list[str]] = []
    for table in tables:
        if table.header == header:
            rows += table.rows
            continue
        index = {c: i for i, c in enumerate(table.header)}
        rows += [[row[index[c]] if c in index else "" for c in header] for row in table.rows]
    return Table(header, rows)


def _records_table(records: list[dict[str, Any]], source: str) -> Table:
    try:
        return table_from_records(records)
    except PermanentError as exc:
        raise PermanentError("not_records", f"{source}: {exc.message}") from exc


def table_from_http(
    http: events_pb2.HttpSource, message: PushMessage, settings: SourceSettings
) -> Table:
    if not http.urls:
        raise PermanentError("invalid_message", "http source has no urls")
    tables = []
    for url in http.urls:
        fmt = http.format.lower() or ("csv" if url.split("?")[0].endswith(".csv") else "json")
        if fmt not in ("csv", "json"):
            raise PermanentError("invalid_message", f"http source format {fmt!r}: csv or json")
        try:
            body, content_type = fetch(url, dict(http.headers), settings.http)
            check_content_type(url, content_type, fmt)
        except FetchError as exc:
            raise _fail(exc, "http", message, settings) from exc
        tables.append(_read(body, fmt, url, "http", http.records_path))
    return _merge(tables, "http")


def _object_name_ok(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not CONTROL.search(name) and ".." not in parts and "." not in parts


def gcs_object(source: events_pb2.GcsSource, settings: SourceSettings) -> tuple[str, str, str]:
    """A `gcs` source's bucket, object name and format, checked: a bucket ingest may read, a
    safe name, a format it reads."""
    try:
        bucket, name = parse_gs_uri(source.uri)
    except ValueError as exc:
        raise PermanentError("bad_object_name", f"gcs source: {exc}") from exc
    if bucket not in settings.allowed_buckets:
        raise PermanentError(
            "bucket_not_allowed",
            f"gcs source {source.uri}: bucket {bucket!r} is not one ingest may read "
            f"(allowed: {list(settings.allowed_buckets)}; MLPIPE_SOURCE_BUCKETS)",
        )
    if not _object_name_ok(name):
        raise PermanentError(
            "bad_object_name",
            f"gcs source {source.uri!r}: object names may not contain '..' or '.' segments "
            f"or control characters",
        )
    fmt = source.format.lower() or name.rsplit(".", 1)[-1].lower()
    if fmt not in ("csv", "parquet", "jsonl"):
        raise PermanentError(
            "invalid_message", f"gcs source {source.uri}: format {fmt!r}: csv, parquet or jsonl"
        )
    return bucket, name, fmt


def table_from_gcs(
    source: events_pb2.GcsSource,
    client: gcs.Client,
    message: PushMessage,
    settings: SourceSettings,
) -> Table:
    bucket, name, fmt = gcs_object(source, settings)
    return _read(_download(client, bucket, name, source.uri, settings), fmt, source.uri, "gcs")


def _download(
    client: gcs.Client, bucket: str, name: str, uri: str, settings: SourceSettings
) -> bytes:
    try:
        blob = client.bucket(bucket).get_blob(name)
        if blob is None:
            raise PermanentError("unreachable", f"gcs source {uri} does not exist")
        if (blob.size or 0) > settings.max_object_bytes:
            raise PermanentError(
                "too_large",
                f"gcs source {uri} is {blob.size} bytes, over the limit of "
                f"{settings.max_object_bytes} bytes",
            )
        return bytes(blob.download_as_bytes(if_generation_match=blob.generation))
    except gexc.NotFound as exc:
        raise PermanentError("unreachable", f"gcs source {uri} does not exist") from exc
    except gexc.Forbidden as exc:
        raise PermanentError("unreachable", f"gcs source {uri}: {exc.message}") from exc


def _read(data: bytes, fmt: str, source: str, kind: str, records_path: str = "") -> Table:
    """A fetched body or object as a table; a problem names the kind of source and the source."""
    try:
        if fmt == "parquet":
            return _parquet_table(data, source)
        text = decode_text(data, source)
        if fmt == "csv":
            return table_from_csv(text, source)
        if fmt == "json":
            return _records_table(parse_json(text, records_path, source), source)
        return _records_table(parse_json_lines(text, source), source)
    except PermanentError as exc:
        raise PermanentError(exc.reason, f"{kind} source: {exc.message}") from exc


def _parquet_table(data: bytes, source: str) -> Table:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not data:
        raise PermanentError("empty_dataset", f"{source} is empty")
    try:
        arrow = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise PermanentError("unreadable_dataset", f"{source} is not valid Parquet: {exc}") from exc
    if arrow.num_rows == 0:
        raise PermanentError("header_only", f"{source} has columns but no rows")
    columns = []
    for column in arrow.columns:
        as_text = pc.cast(column, pa.string()) if column.type != pa.string() else column
        columns.append(["" if v is None else v for v in as_text.to_pylist()])
    return Table(
        [str(c) for c in arrow.column_names], [list(r) for r in zip(*columns, strict=True)]
    )


def table_from_request(
    request: events_pb2.IngestRequest,
    message: PushMessage,
    client: gcs.Client,
    settings: SourceSettings,
) -> tuple[Table, str]:
    """The request's rows and a short description of where they came from."""
    source = request.WhichOneof("source")
    if source == "http":
        return table_from_http(request.http, message, settings), "http:" + ",".join(
            request.http.urls
        )
    if source == "gcs":
        return table_from_gcs(request.gcs, client, message, settings), request.gcs.uri
    if source != "inline":
        raise PermanentError("unsupported_source", f"source {source!r} is not supported")
    inline = request.inline
    if inline.csv and inline.records:
        raise PermanentError("invalid_message", "inline has both csv and records; send one")
    if inline.csv:
        return table_from_csv(inline.csv), "inline"
    if inline.records:
        return table_from_records([events.to_dict(r) for r in inline.records]), "inline"
    raise PermanentError("empty_dataset", "inline has neither csv nor records")
