"""predictor service: serves each model's champion; reloads on DeploymentCompleted."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mlpipe.registry import Registry
from mlpipe.service import Clients, create_app
from mlpipe.settings import CommonSettings, load_settings
from mlpipe_predictor.models import DeploymentListener, InvalidInstances, ModelStore, warm_up

MAX_BODY_BYTES = 1_500_000  # Vertex AI online prediction's request limit


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(CommonSettings)
    clients = Clients.create(settings, stage="predictor")
    warm_up()
    store = ModelStore(Registry(clients.storage))
    store.load_all()
    app.state.clients = clients
    app.state.store = store
    app.state.step = DeploymentListener(store)
    yield


app = create_app("predictor", lifespan)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message}}, status_code=status)


async def _predict(request: Request, model: str | None) -> JSONResponse:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return _error(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        payload: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _error(400, f"body is not JSON: {exc}")
    if not isinstance(payload, dict) or "instances" not in payload:
        return _error(400, "body must be an object with an 'instances' list")
    name = model or payload.get("model")
    try:
        served = request.app.state.store.get(name)
    except KeyError as exc:
        return _error(404, f"no model {name!r} is being served" if name else str(exc.args[0]))
    try:
        predictions = served.predict(payload["instances"])
    except InvalidInstances as exc:
        return _error(400, str(exc))
    return JSONResponse(
        {"predictions": predictions, "model": served.name, "modelVersionId": str(served.version)}
    )


@app.post("/predict")
async def predict(request: Request) -> JSONResponse:
    return await _predict(request, None)


@app.post("/v1/models/{model}:predict")
async def predict_model(model: str, request: Request) -> JSONResponse:
    return await _predict(request, model)


@app.get("/v1/models")
def served_models(request: Request) -> dict[str, Any]:
    return {"models": request.app.state.store.served()}


@app.get("/readyz")
def ready(request: Request) -> JSONResponse:
    served = request.app.state.store.served()
    return JSONResponse(
        {"ready": bool(served), "models": served}, status_code=200 if served else 503
    )
