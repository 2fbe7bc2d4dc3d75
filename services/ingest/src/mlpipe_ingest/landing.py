"""Ingest's step: turn an IngestRequest into a validated dataset object in the landing bucket.

The object name is derived from the content (`<sha256[:16]>.<ext>`) and created with
`if_generation_match=0`, so a redelivered or repeated request lands nothing twice.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import pandas as pd

from mlpipe.errors import PermanentError
from mlpipe.faults import fault_point
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage
from mlpipe.ml.config import load_pipeline_config
from mlpipe.ml.validation import check_dataset, describe_schema, schema_of
from mlpipe.runtime.steps import StepResult, decode_message
from mlpipe.store import layout
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ingest.sources import SourceSettings, table_from_request
from mlpipe_ingest.table import to_csv_bytes, to_parquet_bytes

log = logging.getLogger(__name__)


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


def land(message: PushMessage, deps: Landing) -> StepResult:
    if len(message.data) > deps.max_inline_bytes:
        raise PermanentError(
            "payload_too_large",
            f"request is {len(message.data)} bytes, over the inline limit of "
            f"{deps.max_inline_bytes}; upload the file to "
            f"{deps.storage.uri(layout.dataset_prefix('<name>') + 'dt=YYYY-MM-DD/')} instead",
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
        check_dataset(pd.DataFrame(table.rows, columns=table.header, dtype=str), config, source)
    except PermanentError as exc:
        exc.context = ctx
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
            data_format=events.DATA_FORMAT.of(ext),
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
