"""console service: server-rendered pages of runs, models, failures, drift and batches, and the
promote / rollback / replay actions (wiring only: the reading, the actions and who may act live
in reading, actions and identity)."""

from __future__ import annotations

import mimetypes
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlpipe.runtime import rollout_requests
from mlpipe.runtime.settings import load_settings
from mlpipe.store import layout
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client
from mlpipe_console import actions, charts, identity, pages, reading
from mlpipe_console.settings import ConsoleSettings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(ConsoleSettings)
    storage = Storage(make_client(settings.project), settings.bucket)
    app.state.settings = settings
    app.state.storage = storage
    app.state.registry = Registry(storage)
    app.state.runs = reading.RunIndex(storage, settings.read_workers)
    app.state.probe = reading.BucketProbe(storage)
    app.state.verifier = identity.verifier_for(settings)
    app.state.iap = identity.iap_verifier_for(settings)
    app.state.groups = identity.group_check_for(settings)
    authorization = (
        (lambda: "")
        if settings.console_auth == "local" or not settings.deployer_url
        else (lambda: rollout_requests.id_token_authorization(settings.deployer_url))
    )
    app.state.deployer = actions.Deployer(settings.deployer_url, authorization)
    yield


routes = APIRouter()


def _caller(request: Request) -> identity.Caller:
    state = request.app.state
    return identity.identify(
        request.headers, state.settings, state.verifier, state.iap, state.groups
    )


def _page(request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("caller", getattr(request.state, "caller", None))
    return HTMLResponse(pages.render(template, **context), status_code=code)


def _error(request: Request, status: int, title: str, detail: str) -> HTMLResponse:
    return _page(request, "error.html", status, status=status, title=title, detail=detail)


def _reachable(request: Request) -> None:
    """Unavailable at once when the bucket cannot be reached (see reading.BucketProbe)."""
    request.app.state.probe.check()


async def who_is_calling(request: Request, call_next: Any) -> Response:
    """Every page needs a known caller; a form must come from the console's own pages."""
    if request.url.path in ("/healthz",) or request.url.path.startswith("/static/"):
        return await call_next(request)
    try:
        request.state.caller = _caller(request)
    except identity.IdentityError as exc:
        request.state.caller = None
        return _error(request, exc.status, "Not signed in", exc.message)
    origin = request.headers.get("origin")
    if (
        request.method == "POST"
        and origin
        and urllib.parse.urlsplit(origin).netloc != (request.headers.get("host", ""))
    ):
        return _error(request, 403, "Refused", f"a form from {origin} cannot act here")
    return await call_next(request)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return _error(request, 404, "Not found", f"nothing at {request.url.path}")
    return _error(request, exc.status_code, "Error", str(exc.detail))


async def unavailable(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, reading.Unavailable)
    return _page(
        request,
        "error.html",
        503,
        status=503,
        title="Unavailable",
        detail="",
        unavailable=[exc],
    )


async def failed(request: Request, exc: Exception) -> Response:
    return _error(request, 500, "Something went wrong", f"{type(exc).__name__}: {exc}"[:300])


@routes.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok", "service": "console"}


@routes.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/runs", status_code=302)


@routes.get("/runs", response_class=HTMLResponse)
def runs(
    request: Request, state: str = "", model: str = "", pipeline: str = "", page: int = 1
) -> HTMLResponse:
    _reachable(request)
    settings: ConsoleSettings = request.app.state.settings
    listing = request.app.state.runs.page(
        state=state, model=model, pipeline=pipeline, page=page, page_size=settings.page_size
    )
    filters = {"state": state, "model": model, "pipeline": pipeline}

    def query(**changes: Any) -> str:
        return urllib.parse.urlencode({k: v for k, v in {**filters, **changes}.items() if v})

    return _page(request, "runs.html", listing=listing, filters=filters, query=query)


@routes.get("/runs/{run_id}", response_class=HTMLResponse)
def run(request: Request, run_id: str) -> HTMLResponse:
    if not layout.RUN_ID_PATTERN.match(run_id):
        return _error(request, 404, "Not found", f"{run_id!r} is not a run id")
    _reachable(request)
    found = reading.run_detail(request.app.state.storage, run_id)
    if found is None:
        return _error(request, 404, "Not found", f"no run {run_id} is recorded")
    settings: ConsoleSettings = request.app.state.settings
    found.trace = reading.run_trace(settings.trace_dir, run_id, found.trace_id)
    found.cost, found.cost_problem, found.cost_source = reading.run_cost_of(
        request.app.state.storage, found, settings.cost_sizes, settings.prices
    )
    trace_link = (
        f"https://console.cloud.google.com/traces/list?project={settings.project}"
        f"&tid={found.trace_id}"
        if found.trace_id and settings.trace_exporter == "cloud-trace"
        else ""
    )
    drawn = []
    if found.trace:
        drawn.append({"id": "chart-trace", "spec": charts.trace_chart(found.trace)})
    if found.timeline:
        drawn.append({"id": "chart-timeline", "spec": charts.timeline_chart(found.timeline)})
    if found.gates:
        drawn.append({"id": "chart-gates", "spec": charts.gates_chart(found.gates)})
    if found.metrics:
        spec = charts.metrics_chart(found.metrics, found.champion_version)
        drawn.append({"id": "chart-metrics", "spec": spec})
    plots = charts.plot_views(found.plots)
    drawn += [{"id": view.chart_id, "spec": view.spec} for view in plots if view.spec]
    return _page(request, "run.html", run=found, charts=drawn, plots=plots, trace_link=trace_link)


@routes.get("/models", response_class=HTMLResponse)
def models(request: Request) -> HTMLResponse:
    _reachable(request)
    state = request.app.state
    names = reading.model_names(state.registry)
    views = [v for name in names if (v := reading.model_view(state.registry, name))]
    approvals = reading.pending_approvals(state.storage)
    return _page(request, "models.html", models=views, approvals=approvals, env=state.settings.env)


ROLLOUT_TEXT = {
    "promote": "The canary gets 100% of the traffic and becomes the champion.",
    "rollback": "A running canary is stopped (the champion keeps 100%); without one, the "
    "champion goes back to the version it replaced.",
}


@routes.get("/models/{model}/{action}", response_class=HTMLResponse)
def confirm_rollout(request: Request, model: str, action: str) -> HTMLResponse:
    if action not in actions.ROLLOUT_ACTIONS:
        return _error(request, 404, "Not found", f"no action {action!r}")
    return _page(
        request,
        "confirm.html",
        action=action,
        target=model,
        explanation=ROLLOUT_TEXT[action],
        post_to=f"/models/{model}/{action}",
        fields={},
        back="/models",
    )


@routes.post("/models/{model}/{action}", response_class=HTMLResponse)
def rollout(request: Request, model: str, action: str, confirm: str = Form("")) -> HTMLResponse:
    if action not in actions.ROLLOUT_ACTIONS:
        return _error(request, 404, "Not found", f"no action {action!r}")
    if confirm != "yes":
        return confirm_rollout(request, model, action)
    state = request.app.state
    entry = actions.rollout(state.storage, state.deployer, request.state.caller, model, action)
    return _page(request, "done.html", entry.status, entry=entry, back="/models")


@routes.get("/failures", response_class=HTMLResponse)
def failures(request: Request) -> HTMLResponse:
    state = request.app.state
    view = reading.failures_view(state.storage, state.settings.project, state.probe)
    return _page(request, "failures.html", view=view, unavailable=view.unavailable)


@routes.get("/failures/replay", response_class=HTMLResponse)
def confirm_replay(request: Request, id: str = "") -> HTMLResponse:
    if not id:
        return _error(request, 404, "Not found", "no failure named (?id=)")
    return _page(
        request,
        "confirm.html",
        action="replay",
        target=id,
        explanation="The original message is published again to the topic it came from.",
        post_to="/failures/replay",
        fields={"id": id},
        back="/failures",
    )


@routes.post("/failures/replay", response_class=HTMLResponse)
def replay(request: Request, id: str = Form(""), confirm: str = Form("")) -> HTMLResponse:
    if confirm != "yes":
        return confirm_replay(request, id)
    state = request.app.state
    entry = actions.replay(state.storage, state.settings.project, request.state.caller, id)
    return _page(request, "done.html", entry.status, entry=entry, back="/failures")


@routes.get("/drift", response_class=HTMLResponse)
def drift(request: Request) -> HTMLResponse:
    _reachable(request)
    state = request.app.state
    checks = reading.drift_checks(state.storage, reading.model_names(state.registry))
    drawn = [
        {
            "id": f"chart-drift-{i}",
            "spec": charts.drift_chart(
                c["features"], (c.get("thresholds") or {}).get("psi_threshold")
            ),
        }
        for i, c in enumerate(checks, start=1)
        if c.get("features")
    ]
    # Each feature's histogram: the bins the check compared, reference against served.
    for i, c in enumerate(checks, start=1):
        for j, feature in enumerate(c.get("features") or [], start=1):
            spec = charts.histogram_chart(feature)
            if spec is not None:
                drawn.append({"id": f"chart-histogram-{i}-{j}", "spec": spec})
    return _page(request, "drift.html", checks=checks, charts=drawn)


@routes.get("/batches", response_class=HTMLResponse)
def batches(request: Request) -> HTMLResponse:
    _reachable(request)
    state = request.app.state
    found = reading.batch_runs(state.storage, reading.model_names(state.registry))
    return _page(request, "batches.html", batches=found)


@routes.get("/actions", response_class=HTMLResponse)
def recorded_actions(request: Request) -> HTMLResponse:
    _reachable(request)
    with reading.reaching(f"the bucket gs://{request.app.state.storage.bucket_name}"):
        entries = actions.recent(request.app.state.storage)
    return _page(request, "actions.html", entries=entries)


@routes.get("/objects/{path:path}")
def bucket_object(request: Request, path: str) -> Response:
    """A run's artifact, a drift page, a batch output or a kept input, from the bucket; served
    sandboxed (no script of it runs as the console)."""
    if not reading.readable(path):
        return _error(request, 404, "Not found", f"the console does not serve {path}")
    _reachable(request)
    with reading.reaching(f"the bucket gs://{request.app.state.storage.bucket_name}"):
        found = request.app.state.storage.read(path)
    if found is None:
        return _error(request, 404, "Not found", f"no object {path}")
    kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if path.startswith(layout.QUARANTINE):
        kind = "text/plain; charset=utf-8"  # kept input is never rendered
    return Response(
        found.data,
        media_type=kind,
        headers={"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"},
    )


def create_console() -> FastAPI:
    """The console app: its pages, the shipped static files, who is calling, error pages."""
    console = FastAPI(
        title="mlpipe console",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # No request spans of FastAPI's own, as for every service (mlpipe.runtime.service).
        telemetry={"tracing": False, "operation_spans": False},
    )
    console.include_router(routes)
    console.mount(
        "/static",
        StaticFiles(directory=str(resources.files("mlpipe_console") / "static")),
        name="static",
    )
    console.middleware("http")(who_is_calling)
    console.add_exception_handler(StarletteHTTPException, http_error)
    console.add_exception_handler(reading.Unavailable, unavailable)
    console.add_exception_handler(Exception, failed)
    return console


app = create_console()
