"""evaluator service: TrainingCompleted → holdout metrics and quality gates; MonitoringRequest
(or POST /v1/monitoring/{pipeline}:check) → a drift check of the pipeline's champion."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.runtime.clients import Clients
from mlpipe.runtime.service import create_app
from mlpipe.runtime.settings import load_settings
from mlpipe.v1 import events_pb2
from mlpipe_evaluator.evaluation import Evaluator
from mlpipe_evaluator.settings import EvaluatorSettings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(EvaluatorSettings)
    clients = Clients.create(settings, stage="evaluator")
    app.state.clients = clients
    step = app.state.step = Evaluator(
        clients.storage,
        clients.publisher,
        settings.code_version,
        cost_sizes=settings.cost_sizes,
        prices=settings.prices,
    )
    # Reports a stopped instance left undrawn; off the start path.
    threading.Thread(target=step.reports.sweep, name="report-sweep", daemon=True).start()
    try:
        yield
    finally:
        await run_in_threadpool(step.reports.drain, 10.0)
        await run_in_threadpool(step.drawer.close)


app = create_app("evaluator", lifespan)


@app.post("/v1/monitoring/{pipeline}:check")
async def check_drift(pipeline: str, request: Request, window_hours: float = 0.0) -> JSONResponse:
    """Run a drift check now and answer its report (drift.json's content)."""
    from mlpipe_evaluator import monitor

    step: Evaluator = request.app.state.step
    ask = events_pb2.MonitoringRequest(
        request_id=request.headers.get("x-mlpipe-request-id", "")[:64],
        pipeline=pipeline,
        window_hours=window_hours,
        requested_at=events.timestamp(),
    )
    try:
        result = await run_in_threadpool(
            monitor.check, step.storage, step.publisher, step.code_version, ask, step.champions.load
        )
    except PermanentError as exc:
        status = 404 if exc.reason in {"no_champion", "unknown_pipeline"} else 400
        return JSONResponse({"error": {"code": status, "message": exc.message}}, status_code=status)
    return JSONResponse(result.report)
