"""The predictor's HTTP API: Vertex AI online prediction's shapes, plus plain routes.

    POST /v1/projects/{p}/locations/{l}/endpoints/{endpoint}:predict   Vertex AI PredictRequest
    GET  /v1/projects/{p}/locations/{l}/endpoints/{endpoint}           Vertex AI Endpoint
    POST /v1/models/{model}:predict   POST /predict                    {"instances": [...]}

The endpoint id is the model name. `parameters` may be {"probabilities": true}: each prediction
is then {"label", "classes", "scores"}. Errors use Google's JSON error shape, so client
libraries raise their usual exceptions. The predict routes are plain Starlette endpoints: the
request path is one JSON parse, one validation pass and one model call.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from mlpipe.ml.model_inputs import InvalidInstances
from mlpipe.ml.scoring import LoadedModel
from mlpipe_predictor import vertex
from mlpipe_predictor.models import ModelStore

log = logging.getLogger(__name__)

STATUS = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
PARAMETERS = {"probabilities"}


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": STATUS.get(status, "UNKNOWN")}}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


def parse(body: bytes) -> tuple[Any, bool, str | None]:
    """(instances, probabilities wanted, model named in the body)."""
    try:
        payload: Any = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(400, f"body is not JSON: {exc}") from None
    if not isinstance(payload, dict) or "instances" not in payload:
        raise BadRequest(400, "body must be an object with an 'instances' list")
    parameters = payload.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise BadRequest(400, "'parameters' must be an object")
    unknown = sorted(set(parameters) - PARAMETERS)
    if unknown:
        raise BadRequest(400, f"unknown parameter(s) {unknown}; known: {sorted(PARAMETERS)}")
    probabilities = parameters.get("probabilities", False)
    if not isinstance(probabilities, bool):
        raise BadRequest(400, "parameters.probabilities must be true or false")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(400, "'model' must be a string")
    return payload["instances"], probabilities, model


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for key, value in scope["headers"]:
        if key == b"content-length" and value.isdigit() and int(value) > limit:
            raise BadRequest(413, f"request body is {int(value)} bytes; the limit is {limit}")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(400, "the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def score(
    state: Any, scope: Scope, receive: Receive, name: str | None
) -> tuple[LoadedModel, Any, list[Any]]:
    """Read, validate and score one request; raise BadRequest for anything the caller sent."""
    body = await read_body(scope, receive, state.settings.max_body_bytes)
    instances, probabilities, named = parse(body)
    name = name or named
    store: ModelStore = state.store
    try:
        model, watch = store.route(name)
    except KeyError as exc:
        message = f"no model {name!r} is being served" if name else str(exc.args[0])
        raise BadRequest(404, message) from None
    try:
        if isinstance(instances, list) and len(instances) <= state.settings.inline_instances:
            predictions = model.predict(instances, probabilities)
        else:
            predictions = await run_in_threadpool(model.predict, instances, probabilities)
    except InvalidInstances as exc:
        raise BadRequest(400, str(exc)) from None
    except (ValueError, TypeError) as exc:
        # The model refused values that passed validation: the caller's to fix, not a 5xx.
        raise BadRequest(400, f"{model.name} v{model.version} cannot score these: {exc}") from None
    except Exception:
        store.report(model.name, watch, ok=False)
        raise
    store.report(model.name, watch, ok=True)
    return model, instances, predictions


def _model_path(project: str, location: str, model: str) -> str:
    return f"projects/{project}/locations/{location}/models/{model}"


def reply(model: LoadedModel, predictions: list[Any], vertex: dict[str, str] | None) -> dict:
    if vertex is None:
        return {
            "predictions": predictions,
            "model": model.name,
            "modelVersionId": str(model.version),
        }
    return {
        "predictions": predictions,
        "deployedModelId": str(model.version),
        "model": _model_path(vertex["project"], vertex["location"], model.name),
        "modelVersionId": str(model.version),
        "modelDisplayName": model.name,
    }


PLAIN = re.compile(r"^/predict$")
MODEL = re.compile(r"^/v1/models/(?P<model>[^/]+):predict$")
VERTEX = re.compile(
    r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"/endpoints/(?P<endpoint>[^/]+):predict$"
)


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class PredictRoutes:
    """The ASGI app uvicorn runs: the three predict routes are answered here directly (no
    middleware, routing table or Request object on the request path); everything else, and
    the lifespan, goes to the FastAPI app."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = getattr(self.app.state, "settings", None)
        on_vertex = getattr(settings, "on_vertex", False)
        if scope["type"] == "http" and on_vertex and await self._vertex(scope, receive, send):
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if PLAIN.match(path):
                return await self._predict(scope, receive, send, None, None)
            found = MODEL.match(path)
            if found:
                return await self._predict(scope, receive, send, found["model"], None)
            found = VERTEX.match(path)
            if found:
                params = found.groupdict()
                return await self._predict(scope, receive, send, params["endpoint"], params)
        await self.app(scope, receive, send)

    async def _vertex(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Under Vertex AI (mlpipe_predictor.vertex): answer its health and predict routes,
        refuse the push route; False for any other request, which the usual routes answer."""
        settings = self.state.settings
        path, method = scope["path"], scope["method"]
        if method == "POST" and path == settings.aip_predict_route:
            await self._predict(
                scope, receive, send, settings.serve_model, None, vertex.predictions_only
            )
            return True
        if method == "GET" and path == settings.aip_health_route:
            served = self.state.store.served()
            await send_json(send, 200 if served else 503, {"ready": bool(served), "models": served})
            return True
        if path == "/pubsub/push":
            message = "no Pub/Sub push reaches a Vertex AI deployment"
            await send_json(send, 404, {"error": {"code": 404, "message": message}})
            return True
        return False

    async def _predict(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        name: str | None,
        vertex: dict[str, str] | None,
        shape: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        started = time.perf_counter()
        state = self.app.state
        served, version, count = name or "-", "-", 0
        try:
            model, instances, predictions = await score(state, scope, receive, name)
            status, body = 200, reply(model, predictions, vertex)
            if shape is not None:
                body = shape(body)
            served, version, count = model.name, str(model.version), len(predictions)
            state.prediction_log.record(model, instances, predictions)
        except BadRequest as exc:
            status, body = exc.status, error_body(exc.status, exc.message)
        except Exception as exc:
            log.exception("prediction failed")
            status, body = 500, error_body(500, f"prediction failed: {type(exc).__name__}")
        state.serving_metrics.observe(
            served, version, time.perf_counter() - started, status == 200, count
        )
        await send_json(send, status, body)


async def vertex_endpoint(request: Request) -> JSONResponse:
    """GET /v1/projects/{p}/locations/{l}/endpoints/{endpoint} (EndpointService.GetEndpoint)."""
    p = request.path_params
    name = p["endpoint"]
    served = request.app.state.store.served().get(name)
    if served is None:
        return error(404, f"endpoint {name!r} not found: no model {name!r} is being served")
    model_path = _model_path(p["project"], p["location"], name)
    return JSONResponse(
        {
            "name": f"projects/{p['project']}/locations/{p['location']}/endpoints/{name}",
            "displayName": name,
            "deployedModels": [
                {
                    "id": str(t["version"]),
                    "model": model_path,
                    "modelVersionId": str(t["version"]),
                    "displayName": f"{name}-v{t['version']}",
                }
                for t in served["traffic"]
            ],
            "trafficSplit": {str(t["version"]): t["percent"] for t in served["traffic"]},
        }
    )
