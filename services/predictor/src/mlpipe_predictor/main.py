"""predictor service: serves each model's champion (and canary); reloads on DeploymentCompleted;
Vertex AI-compatible predict API; batch prediction jobs."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.ml.scoring import warm_up
from mlpipe.runtime.clients import Clients
from mlpipe.runtime.service import create_app
from mlpipe.runtime.settings import load_settings
from mlpipe.store.registry import Registry
from mlpipe.v1 import events_pb2
from mlpipe_predictor.api import PredictRoutes, error, vertex_endpoint
from mlpipe_predictor.champion_scoring import ChampionScoring
from mlpipe_predictor.launch import JobLaunch, batch_launcher
from mlpipe_predictor.models import ModelStore, RegistryWatch, promote_canary
from mlpipe_predictor.monitoring import PredictionLog, ServingMetrics
from mlpipe_predictor.settings import PredictorSettings
from mlpipe_predictor.steps import BatchJobs, BatchStep, PredictorStep
from mlpipe_predictor.vertex import ArtifactDirectory


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(PredictorSettings)
    clients = Clients.create(settings, stage="predictor", receives_push=settings.receives_push)
    warm_up()
    pinned = (settings.serve_model, settings.serve_version) if settings.serve_model else None
    registry = (
        ArtifactDirectory(clients.storage.client, settings.aip_storage_uri)
        if settings.on_vertex
        else Registry(clients.storage)
    )
    store = ModelStore(registry, threads=settings.onnx_threads, pinned=pinned)
    store.on_promotion = partial(
        promote_canary, store, clients.publisher.publish, settings.code_version
    )
    store.load_all()
    # Every instance follows the registry, not only the one the push reaches.
    watch = RegistryWatch(
        store,
        settings.registry_watch_seconds,
        # Cloud Run names the revision in K_REVISION (its container contract).
        about={"revision": os.environ.get("K_REVISION", ""), "code_version": settings.code_version},
    )
    watch.start()
    app.state.watch = watch
    app.state.settings = settings
    app.state.clients = clients
    app.state.store = store
    app.state.jobs = BatchJobs(
        clients.storage,
        store,
        settings.batch_chunk_rows,
        cost_sizes=settings.cost_sizes,
        prices=settings.prices,
    )
    batch = BatchStep(
        clients.storage,
        clients.publisher,
        app.state.jobs,
        JobLaunch(
            clients.storage,
            batch_launcher(settings),
            job_timeout_seconds=settings.batch_job_timeout_seconds,
        ),
        code_version=settings.code_version,
        inline_max_bytes=settings.batch_inline_max_bytes,
        bad_rows=settings.batch_bad_rows,
    )
    scoring = (
        None
        if settings.on_vertex
        else ChampionScoring(
            clients.storage,
            clients.publisher,
            Registry(clients.storage),
            settings.code_version,
            settings.env,
        )
    )
    app.state.step = PredictorStep(store, batch, scoring)
    app.state.serving_metrics = ServingMetrics()
    app.state.prediction_log = PredictionLog(
        clients.storage,
        rate=settings.prediction_log_rate,
        capacity=settings.prediction_log_buffer,
        flush_seconds=settings.prediction_log_flush_seconds,
    )
    app.state.prediction_log.start()
    try:
        yield
    finally:
        await run_in_threadpool(watch.stop)
        await run_in_threadpool(app.state.prediction_log.stop)


service = create_app("predictor", lifespan)
service.add_route(
    "/v1/projects/{project}/locations/{location}/endpoints/{endpoint}",
    vertex_endpoint,
    methods=["GET"],
    include_in_schema=False,
)
# uvicorn runs this: POST /predict, /v1/models/{m}:predict and the Vertex AI :predict route
# are answered before FastAPI; every other route and the lifespan are FastAPI's.
app = PredictRoutes(service)


@service.get("/v1/models")
def served_models(request: Request) -> dict[str, Any]:
    """What this instance serves, which instance it is, and how its registry watch is doing."""
    state = request.app.state
    return {
        "models": state.store.served(),
        "instance": state.store.instance,
        "watch": state.watch.status.as_dict(),
    }


@service.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Serving metrics in Prometheus' text format (async: read on the loop that updates them)."""
    state = request.app.state
    return PlainTextResponse(
        state.serving_metrics.render(state.prediction_log.counts),
        media_type="text/plain; version=0.0.4",
    )


@service.get("/v1/monitoring")
async def monitoring(request: Request) -> dict[str, Any]:
    """The same figures as JSON, for `mlpipe status`."""
    state = request.app.state
    return {
        "serving": state.serving_metrics.snapshot(),
        "prediction_log": dict(state.prediction_log.counts),
    }


@service.post("/v1/monitoring:flush")
async def flush_prediction_log(request: Request) -> dict[str, Any]:
    """Write the buffered prediction log now (the drift check calls it before reading)."""
    written = await run_in_threadpool(request.app.state.prediction_log.flush)
    return {"written": written, **request.app.state.prediction_log.counts}


@service.get("/readyz")
def ready(request: Request) -> JSONResponse:
    served = request.app.state.store.served()
    return JSONResponse(
        {"ready": bool(served), "models": served}, status_code=200 if served else 503
    )


@service.post("/v1/batchPredictions")
async def start_batch(request: Request) -> JSONResponse:
    """Start a batch job; the body is a BatchPredictionRequest in its JSON encoding."""
    try:
        batch = events.decode(events_pb2.BatchPredictionRequest, await request.body(), "JSON")
        state = request.app.state.jobs.start(batch)
    except events.EventDecodeError as exc:
        return error(400, str(exc))
    except PermanentError as exc:
        return error(400, exc.message)
    return JSONResponse(state, status_code=200 if state["state"] == "succeeded" else 202)


@service.get("/v1/batchPredictions/{model}/{batch_id}")
def batch_status(model: str, batch_id: str, request: Request) -> JSONResponse:
    state = request.app.state.jobs.status(model, batch_id)
    if state is None:
        return error(404, f"no batch {batch_id!r} of {model}")
    return JSONResponse(state)
