"""deployer service: EvaluationCompleted → registry version + rollout; promote/rollback routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from mlpipe.messaging import events
from mlpipe.runtime.clients import Clients
from mlpipe.runtime.service import RETRYABLE, create_app, every
from mlpipe.runtime.settings import load_settings
from mlpipe.store.registry import Registry, RolloutError
from mlpipe_deployer import progress, rollout
from mlpipe_deployer.deployment import Deployer
from mlpipe_deployer.onnx_compile import warm_up
from mlpipe_deployer.settings import DeployerSettings
from mlpipe_deployer.targets.configured import make_target

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(DeployerSettings)
    clients = Clients.create(settings, stage="deployer")
    app.state.clients = clients
    app.state.step = deployer = Deployer(
        clients.storage,
        clients.publisher,
        Registry(clients.storage, settings.registry_claim_lease_seconds),
        settings.code_version,
        make_target(settings),
        settings.canary_percent,
        settings.canary_promote_after,
        settings.compile_onnx,
        cost_sizes=settings.cost_sizes,
        prices=settings.prices,
    )
    if settings.compile_onnx:
        # After the port answers, on the compilations' own thread: a compilation asked for
        # before it ends waits behind it instead of paying the first conversion itself.
        deployer.precompiled.warm_up(warm_up)
    # Locally, what Cloud Scheduler does on GCP: POST /v1/rollouts:check.
    async with every(
        settings.rollout_check_seconds,
        lambda: progress.check_all(deployer),
        "checking the running rollouts",
    ):
        yield


app = create_app("deployer", lifespan)


async def _step(request: Request, model: str, action: str) -> JSONResponse:
    deps: Deployer = request.app.state.step
    who = request.headers.get("x-mlpipe-requested-by", "cli")[:64]
    try:
        if action == "promote":
            done = await run_in_threadpool(rollout.promote, deps, model, who)
        else:
            done = await run_in_threadpool(rollout.rollback, deps, model, who)
    except RolloutError as exc:
        return JSONResponse({"error": {"code": 409, "message": str(exc)}}, status_code=409)
    except RETRYABLE as exc:
        return JSONResponse({"error": {"code": 503, "message": str(exc)}}, status_code=503)
    if not done.finished:
        # Accepted: DeploymentCompleted follows once the target's operations are done.
        return JSONResponse(
            {**events.to_dict(done.event), "operations": done.operations}, status_code=202
        )
    return JSONResponse(events.to_dict(done.event))


@app.post("/v1/models/{model}:promote")
async def promote(model: str, request: Request) -> JSONResponse:
    """Give the canary 100% of the traffic: it becomes the champion."""
    return await _step(request, model, "promote")


@app.post("/v1/models/{model}:rollback")
async def rollback(model: str, request: Request) -> JSONResponse:
    """Stop the canary, or move the champion back to the version it replaced."""
    return await _step(request, model, "rollback")


@app.post("/v1/rollouts:check")
async def check_rollouts(request: Request) -> JSONResponse:
    """Advance every running rollout (Cloud Scheduler calls this on GCP)."""
    try:
        checked = await run_in_threadpool(progress.check_all, request.app.state.step)
    except RETRYABLE as exc:
        return JSONResponse({"error": {"code": 503, "message": str(exc)}}, status_code=503)
    return JSONResponse({"rollouts": checked})
