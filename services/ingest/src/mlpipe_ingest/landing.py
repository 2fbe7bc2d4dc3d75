"""Ingest's step: turn an IngestRequest into a validated dataset object in the landing bucket.

The object name is derived from the content (`<sha256[:16]>.<ext>`) and created with
`if_generation_match=0`, so a redelivered or repeated request lands nothing twice.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import pandas as pd

from mlpipe import tracing
from mlpipe.errors import PermanentError
from mlpipe.faults import fault_point
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage
from mlpipe.ml.config import PipelineConfig, load_pipeline_config
from mlpipe.ml.validation import check_dataset, describe_schema, schema_of
from mlpipe.runtime.steps import Router, StepResult, permanent
from mlpipe.store import layout
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ingest.exports import Exports
from mlpipe_ingest.large_landing import KIND, LargeLandings
from mlpipe_ingest.sources import SourceSettings, table_from_request
from mlpipe_ingest.table import Table, to_csv_bytes, to_parquet_bytes

log = logging.getLogger(__name__)


@dataclass
class Landing:
    storage: Storage
    publisher: Publisher
    code_version: str
    max_inline_bytes: int
    env: str = "local"
    sources: SourceSettings | None = None
    # Sources that are a cloud export (Earth Engine, BigQuery): started here, landed by the
    # exports check (mlpipe_ingest.exports).
    exports: Exports | None = field(default=None, repr=False)
    # Large `gcs` sources: validated by a Beam job, begun and landed like an export.
    large: LargeLandings | None = field(default=None, repr=False)

    def __call__(self, message: PushMessage) -> StepResult:
        if len(message.data) > self.max_inline_bytes:
            return permanent(
                PermanentError(
                    "payload_too_large",
                    f"request is {len(message.data)} bytes, over the inline limit of "
                    f"{self.max_inline_bytes}; upload the file to "
                    f"{self.storage.uri(layout.dataset_prefix('<name>') + 'dt=YYYY-MM-DD/')} "
                    "instead",
                )
            )
        return Router({INGEST_REQUEST: lambda request, m: land(request, m, self)}, INGEST_REQUEST)(
            message
        )


INGEST_REQUEST = events_pb2.IngestRequest.DESCRIPTOR.full_name


def land(request: events_pb2.IngestRequest, message: PushMessage, deps: Landing) -> StepResult:
    """IngestRequest → a checked dataset object → DatasetLanded. No claim and no record: the
    object is named by its content and created only if absent, so it is its own record.
    A source that is an export is started and recorded instead, and landed by its check."""
    if deps.exports is not None:
        large = deps.large is not None and deps.large.takes(request)
        if large or deps.exports.handles(request):
            try:
                # The pipeline must exist before anything is started for it.
                load_pipeline_config(deps.storage, request.dataset, deps.env)
            except PermanentError as exc:
                return permanent(exc)
            return deps.exports.begin(request, message, KIND if large else "")
    try:
        landed, rows = land_request(request, message, deps)
    except PermanentError as exc:
        return permanent(exc)
    deps.publisher.publish(landed)
    already = landed.already_present
    log.info(
        "landed %s (%d rows)%s",
        landed.dataset.uri,
        rows,
        " — identical content was already there" if already else "",
        extra={"run_id": landed.context.run_id},
    )
    return StepResult(
        "landed" if not already else "duplicate",
        {"dataset_uri": landed.dataset.uri},
        run_id=landed.context.run_id,
    )


def checked_table(
    request: events_pb2.IngestRequest,
    message: PushMessage,
    deps: Landing,
    config: PipelineConfig,
    ctx: events_pb2.RunContext,
) -> tuple[Table, str]:
    """The request's rows, fetched and checked against the pipeline's dataset contract."""
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
    return table, source


def land_request(
    request: events_pb2.IngestRequest, message: PushMessage, deps: Landing
) -> tuple[events_pb2.DatasetLanded, int]:
    """The pure step: write the request's checked rows where their content names them."""
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
    table, source = checked_table(request, message, deps, config, ctx)
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
        # The training this object's notification starts continues this trace.
        **tracing.object_metadata(),
    }
    generation, already, landed_at = write_once(deps.storage, path, data, ext, metadata)
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
    return landed, len(table.rows)


def write_once(
    storage: Storage, path: str, data: bytes, ext: str, metadata: dict[str, str]
) -> tuple[int, bool, dt.datetime]:
    """Create the object unless it exists: (its generation, whether identical content was
    already there, when it landed)."""
    generation = storage.create_if_absent(
        path,
        data,
        content_type="text/csv" if ext == "csv" else "application/vnd.apache.parquet",
        metadata=metadata,
    )
    if generation is not None:
        return generation, False, dt.datetime.now(dt.UTC)
    existing = storage.bucket.get_blob(path)
    if existing is None:
        return 0, True, dt.datetime.now(dt.UTC)
    return int(existing.generation), True, existing.time_created or dt.datetime.now(dt.UTC)


def land_export(
    request: events_pb2.IngestRequest,
    objects: tuple[str, ...],
    requested_at: dt.datetime,
    deps: Landing,
) -> events_pb2.DatasetLanded:
    """A finished export's CSV landed like any dataset: read through the `gcs` source from
    the staging prefix (in the landing bucket), checked, written once by content."""
    if len(objects) != 1:
        raise PermanentError("export_shards", f"expected one exported file, not {list(objects)}")
    staged = events_pb2.IngestRequest()
    staged.CopyFrom(request)
    staged.gcs.uri = objects[0]  # replaces the export source in the oneof
    staged.gcs.format = "csv"
    if not staged.HasField("requested_at"):
        staged.requested_at.CopyFrom(events.timestamp(requested_at))
    message = PushMessage(
        data=b"", attributes={}, message_id="", publish_time=requested_at, delivery_attempt=0
    )
    landed, _ = land_request(staged, message, deps)
    return landed
