"""ingest service: Pub/Sub push of IngestRequest → a dataset object in the landing bucket.

`POST /v1/ingest` takes the same IngestRequest over HTTP (JSON, or binary with a protobuf
content type) from callers that are not Pub/Sub, and answers with the run id and how to
follow it (mlpipe.runtime.service.direct_call).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from mlpipe.runtime.clients import Clients
from mlpipe.runtime.service import RETRYABLE, create_app, direct_endpoint, every
from mlpipe.runtime.settings import load_settings
from mlpipe.v1 import events_pb2
from mlpipe_ingest.exports import ExportBackend, Exports, LazyBackend, check_exports
from mlpipe_ingest.landing import Landing, land_export
from mlpipe_ingest.large_landing import LargeLandings, validation_launcher
from mlpipe_ingest.settings import IngestSettings
from mlpipe_ingest.sources_earthengine import EarthEngineBackend

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(IngestSettings)
    clients = Clients.create(settings, stage="ingest")
    app.state.clients = clients
    app.state.direct_callers = frozenset(settings.direct_callers)
    app.state.step = landing = Landing(
        clients.storage,
        clients.publisher,
        settings.code_version,
        settings.max_inline_bytes,
        settings.env,
        settings.source_settings(),
    )
    earth_engine = EarthEngineBackend(settings.earthengine_settings(), clients.storage.client)
    bigquery = LazyBackend("bigquery", functools.partial(_bigquery, settings))
    landing.exports = app.state.exports = Exports(
        clients.storage,
        clients.publisher,
        {earth_engine.kind: earth_engine, bigquery.kind: bigquery},
        land=functools.partial(land_export, deps=landing),
        failures=clients.failures,
        code_version=settings.code_version,
        env=settings.env,
        timeout_seconds=settings.export_timeout_seconds,
        backoff_seconds=settings.export_backoff_seconds,
        retry_deliveries=settings.source_retry_deliveries,
    )
    landing.large = LargeLandings(
        clients.storage,
        validation_launcher(settings),
        settings.ingest_beam_min_bytes,
        settings.source_settings(),
        env=settings.env,
        chunk_rows=settings.validation_chunk_rows,
    )
    landing.exports.backends[landing.large.kind] = landing.large
    # Locally, what Cloud Scheduler does on GCP: POST /v1/exports:check.
    exports = landing.exports
    async with every(
        settings.export_check_seconds,
        lambda: check_exports(exports),
        "checking the running exports",
    ):
        yield


def _bigquery(settings: IngestSettings) -> ExportBackend:
    # Imported on first use: the BigQuery client is not loaded at every start of ingest.
    from mlpipe_ingest.sources_bigquery import BigQueryExports, bigquery_client

    bq = settings.bigquery_settings()
    return BigQueryExports(
        bigquery_client(bq.project, settings.bigquery_url),
        bq,
        chunk_bytes=settings.export_chunk_bytes,
        local_url=settings.bigquery_url,
    )


app = create_app("ingest", lifespan)
app.add_api_route(
    "/v1/ingest",
    direct_endpoint(events_pb2.IngestRequest, "ingest", lambda r: r.app.state.direct_callers),
    methods=["POST"],
    summary="An IngestRequest over HTTP, for callers that are not Pub/Sub",
)


@app.post("/v1/exports:check")
async def exports_check(request: Request) -> JSONResponse:
    """Poll every running export once; land or fail the finished (Cloud Scheduler on GCP)."""
    try:
        checked = await run_in_threadpool(check_exports, request.app.state.exports)
    except RETRYABLE as exc:
        return JSONResponse({"error": {"code": 503, "message": str(exc)}}, status_code=503)
    return JSONResponse({"exports": checked})
