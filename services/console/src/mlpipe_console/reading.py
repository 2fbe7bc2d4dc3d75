"""What the console shows, read from the bucket through the library (layout, registry,
storage, run_records, kept_failures). Plain functions and types: no web framework.

Anything that cannot be reached (the bucket, the registry, Pub/Sub) raises `Unavailable`
naming it, and the page says so instead of failing.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exceptions
from requests import exceptions as requests_exceptions

from mlpipe import tracing
from mlpipe.messaging import kept_failures
from mlpipe.store import layout, run_cost, run_records
from mlpipe.store.approvals import Approvals
from mlpipe.store.layout import DriftCheckPaths, RegistryPaths, RunPaths
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.store.storage import Storage

T = TypeVar("T")

# What "cannot reach" looks like from the client libraries: an API error, a refused or
# dropped connection, no credentials.
UNREACHABLE: tuple[type[BaseException], ...] = (
    gexc.GoogleAPICallError,
    gexc.RetryError,
    requests_exceptions.ConnectionError,
    requests_exceptions.Timeout,
    auth_exceptions.DefaultCredentialsError,
    auth_exceptions.TransportError,
    ConnectionError,
    TimeoutError,
)


class Unavailable(Exception):
    """Something the page needs cannot be read: `what` names it, `detail` says why."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail


@contextmanager
def reaching(what: str) -> Iterator[None]:
    try:
        yield
    except UNREACHABLE as exc:
        raise Unavailable(what, f"{type(exc).__name__}: {str(exc)[:300]}") from None


class BucketProbe:
    """One quick listing (no retry, a short timeout) before a page reads the bucket, so that an
    unreachable bucket is named at once rather than after the client library's retries (up to
    two minutes); a success is trusted for `fresh_seconds`."""

    def __init__(self, storage: Storage, timeout: float = 3.0, fresh_seconds: float = 5.0) -> None:
        self.storage = storage
        self.timeout = timeout
        self.fresh_seconds = fresh_seconds
        self._ok_at = -fresh_seconds

    def check(self) -> None:
        if time.monotonic() - self._ok_at < self.fresh_seconds:
            return
        with reaching(f"the bucket gs://{self.storage.bucket_name}"):
            blobs = self.storage.client.list_blobs(
                self.storage.bucket_name, max_results=1, retry=None, timeout=self.timeout
            )
            list(blobs)
        self._ok_at = time.monotonic()


# --- runs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSummary:
    run_id: str
    state: str
    pipeline: str
    dataset_uri: str
    model: str
    version: int  # the registry version deployed for it (0: none)
    gates: str  # "passed", "failed" or "" (not evaluated)
    detail: str
    started_at: dt.datetime | None
    duration_seconds: float | None


@dataclass(frozen=True)
class RunPage:
    runs: list[RunSummary]
    total: int  # runs matching the filters
    page: int
    pages: int
    models: list[str]
    pipelines: list[str]
    states: list[str]


def _summary(storage: Storage, run_id: str, names: set[str]) -> RunSummary:
    paths = RunPaths(run_id)
    records: dict[str, dict[str, Any]] = {}
    for name in ("started.json", "training.json", "evaluation.json", "deployment.json"):
        if name in names:
            records[name] = storage.read_json(paths.prefix + name) or {}
    if "failed.json" in names:
        records["failed.json"] = storage.read_json(paths.failed) or {}
    # Every recorded event carries the run's context and dataset: the earliest one says it.
    first = next(
        (
            records[name]
            for name in (
                "started.json",
                "training.json",
                "evaluation.json",
                "deployment.json",
                "failed.json",
            )
            if records.get(name)
        ),
        {},
    )
    context = first.get("context", {})
    dataset = first.get("dataset", {})
    trained = records.get("training.json", {})
    evaluated = records.get("evaluation.json")
    deployed = records.get("deployment.json")
    failed = records.get("failed.json")
    state = run_records.state_of(names, deployed)
    detail = ""
    if failed is not None:
        detail = f"{run_records.failed_stage(failed)}: {failed.get('reason', '?')}"
    elif deployed is not None and not deployed.get("deployed"):
        detail = str(deployed.get("reason", ""))
    hops = run_records.timeline_of(records)
    duration = (hops[-1][1] - hops[0][1]).total_seconds() if len(hops) > 1 else None
    return RunSummary(
        run_id=run_id,
        state=state,
        pipeline=str(context.get("pipeline") or dataset.get("name", "")),
        dataset_uri=str(dataset.get("uri", "")),
        model=str(
            trained.get("model_name")
            or (evaluated or {}).get("model_name")
            or (deployed or {}).get("model_name", "")
        ),
        version=int((deployed or {}).get("version", 0) or 0) if state == "deployed" else 0,
        gates="" if evaluated is None else ("passed" if evaluated.get("passed") else "failed"),
        detail=detail,
        started_at=hops[0][1] if hops else None,
        duration_seconds=duration,
    )


class RunIndex:
    """Every run's summary. A run's records are written once each, so a summary stays right
    while the set of its records (name and generation) is unchanged: one listing of `runs/`
    per page view, and only new or changed runs are read again."""

    def __init__(self, storage: Storage, workers: int = 8) -> None:
        self.storage = storage
        self.workers = workers
        self._cache: dict[str, tuple[tuple[tuple[str, int], ...], RunSummary]] = {}
        self._lock = threading.Lock()

    def _listing(self) -> dict[str, dict[str, int]]:
        runs: dict[str, dict[str, int]] = {}
        blobs = self.storage.client.list_blobs(
            self.storage.bucket_name,
            prefix=layout.RUNS,
            fields="items(name,generation),nextPageToken",
        )
        for blob in blobs:
            parts = blob.name.split("/")
            if len(parts) == 3:
                runs.setdefault(parts[1], {})[parts[2]] = int(blob.generation or 0)
        return runs

    def summaries(self) -> list[RunSummary]:
        with reaching(f"the bucket gs://{self.storage.bucket_name} (runs/)"):
            listing = self._listing()
            wanted = ("started.json", *run_records.STATE_RECORDS)
            stale = []
            with self._lock:
                for run_id, names in listing.items():
                    key = tuple(sorted((n, g) for n, g in names.items() if n in wanted))
                    cached = self._cache.get(run_id)
                    if cached is None or cached[0] != key:
                        stale.append((run_id, key, set(names)))
            if stale:
                with ThreadPoolExecutor(self.workers) as pool:
                    fresh = list(
                        pool.map(lambda s: (s[0], s[1], _summary(self.storage, s[0], s[2])), stale)
                    )
                with self._lock:
                    for run_id, key, summary in fresh:
                        self._cache[run_id] = (key, summary)
            with self._lock:
                for gone in set(self._cache) - set(listing):
                    del self._cache[gone]
                found = [self._cache[r][1] for r in listing if r in self._cache]
        epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
        return sorted(found, key=lambda s: (s.started_at or epoch, s.run_id), reverse=True)

    def page(
        self,
        *,
        state: str = "",
        model: str = "",
        pipeline: str = "",
        page: int = 1,
        page_size: int = 50,
    ) -> RunPage:
        every = self.summaries()
        chosen = [
            s
            for s in every
            if (not state or s.state == state)
            and (not model or s.model == model)
            and (not pipeline or s.pipeline == pipeline)
        ]
        pages = max(1, -(-len(chosen) // page_size))
        page = min(max(1, page), pages)
        return RunPage(
            runs=chosen[(page - 1) * page_size : page * page_size],
            total=len(chosen),
            page=page,
            pages=pages,
            models=sorted({s.model for s in every if s.model}),
            pipelines=sorted({s.pipeline for s in every if s.pipeline}),
            states=sorted({s.state for s in every}),
        )


@dataclass(frozen=True)
class Artifact:
    name: str
    path: str
    size: int


@dataclass
class RunDetail:
    run_id: str
    summary: RunSummary
    records: dict[str, dict[str, Any]]
    timeline: list[tuple[str, dt.datetime, float]]  # label, when, seconds since the first
    gates: list[dict[str, Any]]
    metrics: list[tuple[str, float | None, float | None]]  # name, this run, the champion
    champion_version: int
    lineage: dict[str, Any]
    artifacts: list[Artifact]
    report_path: str = ""
    failure: dict[str, Any] = field(default_factory=dict)
    trace_id: str = ""  # the run's trace (RunContext.trace_id), when tracing was on
    trace: list[dict[str, Any]] = field(default_factory=list)  # tracing.waterfall rows
    cost: run_cost.RunCost | None = None  # the estimate (run_cost_of)
    cost_problem: str = ""  # why there is none
    cost_source: str = ""  # recorded when the run ended, or computed on read
    plots: list[Any] = field(default_factory=list)  # plots.json's entries (run_plots)
    plots_problem: str = ""  # why there are none


def run_cost_of(
    storage: Storage, detail: RunDetail, sizes_json: str, prices_json: str
) -> tuple[run_cost.RunCost | None, str, str]:
    """The run's cost estimate, its problem (why there is none) and where it comes from: the
    estimate recorded when the run ended (runs/<id>/cost.json); for a run without one, computed
    now from what `run_detail` read, its config snapshot and the sizes and prices the console
    was given (MLPIPE_COST_SIZES, MLPIPE_PRICES)."""
    paths = RunPaths(detail.run_id)
    with reaching(f"the bucket gs://{storage.bucket_name} ({paths.cost})"):
        recorded = run_cost.read_record(storage, detail.run_id)
    if recorded is not None:
        return recorded.cost, recorded.problem, recorded.heading()
    source = (
        "computed now: none is recorded for this run (it has not ended, or it ended before "
        "estimates were recorded)"
    )
    if not sizes_json or not prices_json:
        problem = "no sizes or prices given to the console (MLPIPE_COST_SIZES, MLPIPE_PRICES)"
        return None, problem, source
    with reaching(f"the bucket gs://{storage.bucket_name} ({paths.config})"):
        config = storage.read_json(paths.config) or {}
    try:
        sizes, prices = run_cost.parse_tables(sizes_json, prices_json)
        return (
            run_cost.estimate(
                detail.run_id,
                detail.records,
                config,
                sizes,
                {a.name: a.size for a in detail.artifacts},
                prices,
            ),
            "",
            source,
        )
    except run_cost.CostInputError as exc:
        return None, str(exc), source


NO_PLOTS = "No plots recorded for this run"


def run_plots(storage: Storage, run_id: str, recorded: bool) -> tuple[list[Any], str]:
    """The entries of the run's plots.json (docs/evaluation-plots.md), when `recorded`; else
    none and why: not recorded, or what keeps it from being read (the rest of the page is
    shown either way)."""
    path = RunPaths(run_id).plots
    if not recorded:
        return [], NO_PLOTS
    try:
        with reaching(f"the bucket gs://{storage.bucket_name} ({path})"):
            data = storage.read_json(path)
    except Unavailable as exc:
        return [], f"{path} cannot be read: {exc.detail}"
    except ValueError as exc:  # not JSON, or not UTF-8
        return [], f"{path} is not valid JSON: {str(exc)[:200]}"
    if data is None:
        return [], NO_PLOTS
    entries = data.get("plots") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return [], f"{path} holds no list of plots"
    return entries, ""


def run_trace(trace_dir: str, run_id: str, trace_id: str) -> list[dict[str, Any]]:
    """The run's spans as waterfall rows, from the spans the local stack keeps (`trace_dir`);
    none without it (in the cloud the spans are in Cloud Trace: the page links there)."""
    if not trace_dir:
        return []
    return tracing.waterfall(tracing.run_spans(trace_dir, run_id, [trace_id] if trace_id else []))


def run_detail(storage: Storage, run_id: str) -> RunDetail | None:
    """Everything recorded for one run; None when nothing is."""
    paths = RunPaths(run_id)
    with reaching(f"the bucket gs://{storage.bucket_name} ({paths.prefix})"):
        blobs = list(storage.client.list_blobs(storage.bucket_name, prefix=paths.prefix))
        if not blobs:
            return None
        names = {b.name[len(paths.prefix) :] for b in blobs}
        records = {
            name: storage.read_json(paths.prefix + name) or {}
            for name in (
                "started.json",
                "training.json",
                "evaluation.json",
                "deployment.json",
                "failed.json",
                "lineage.json",
                "metrics.json",
            )
            if name in names
        }
        summary = _summary(storage, run_id, names)
    hops = run_records.timeline_of(records)
    origin = hops[0][1] if hops else None
    timeline = [(label, at, (at - origin).total_seconds()) for label, at in hops if origin]
    evaluation = records.get("evaluation.json", {})
    scored = records.get("metrics.json", {})
    gates = list(scored.get("gates") or evaluation.get("gates") or [])
    own = dict(scored.get("metrics") or evaluation.get("metrics") or {})
    champion = scored.get("champion") or {}
    theirs = dict(champion.get("metrics") or evaluation.get("champion_metrics") or {})
    champion_version = int(champion.get("version") or evaluation.get("champion_version") or 0)
    metrics = [(name, own.get(name), theirs.get(name)) for name in sorted(set(own) | set(theirs))]
    lineage = records.get("lineage.json", {})
    if not lineage.get("dataset"):
        first = records.get("started.json") or records.get("training.json") or {}
        lineage = {**lineage, "dataset": first.get("dataset", {})}
    artifacts = sorted(
        (Artifact(b.name[len(paths.prefix) :], b.name, int(b.size or 0)) for b in blobs),
        key=lambda a: a.name,
    )
    plots, plots_problem = run_plots(storage, run_id, "plots.json" in names)
    return RunDetail(
        run_id=run_id,
        summary=summary,
        records=records,
        timeline=timeline,
        gates=gates,
        metrics=metrics,
        champion_version=champion_version,
        lineage=lineage,
        artifacts=artifacts,
        report_path=paths.report if "report.html" in names else "",
        plots=plots,
        plots_problem=plots_problem,
        trace_id=next(
            (
                str(r.get("context", {}).get("trace_id", ""))
                for r in records.values()
                if r.get("context", {}).get("trace_id")
            ),
            "",
        ),
        failure={
            **records.get("failed.json", {}),
            "stage": run_records.failed_stage(records.get("failed.json", {})),
        }
        if "failed.json" in records
        else {},
    )


# --- models -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionRow:
    version: int
    run_id: str
    registered_at: str
    metrics: dict[str, float]
    runtime: str
    aliases: list[str]


@dataclass
class ModelView:
    name: str
    versions: list[VersionRow]
    champion: int | None
    canary: int | None
    shares: list[tuple[int, int, str]]  # version, percent, alias
    history: list[int]
    canary_percent: int = 0
    promote_after: int = 0
    canary_succeeded: int = 0
    canary_failed: int = 0
    # Predictor instances known to serve the canary (they count its outcomes): instance → counts
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Each predictor instance's own record of what it serves (newest first), with `state`:
    # "live", "silent" (no heartbeat for SILENT_AFTER) or "stopped".
    serving: list[dict[str, Any]] = field(default_factory=list)


# An instance that has not rewritten its record for this long (3 heartbeats) is shown silent.
SILENT_AFTER = dt.timedelta(minutes=3)


def instance_states(
    records: list[dict[str, Any]], now: dt.datetime, shares: list[tuple[int, int, str]]
) -> list[dict[str, Any]]:
    """The instance records of one model, the live ones first, newest first, each with its
    `state` and whether it serves the registry's split (`follows`)."""
    split = [(v, p) for v, p, _ in shares]
    shown = []
    for record in records:
        try:
            updated = dt.datetime.fromisoformat(str(record.get("updated_at")))
        except ValueError:
            continue
        if record.get("stopped_at"):
            state = "stopped"
        elif now - updated > SILENT_AFTER:
            state = "silent"
        else:
            state = "live"
        served = [(int(x["version"]), int(x["percent"])) for x in record.get("serving") or []]
        shown.append({**record, "state": state, "follows": served == split})
    shown.sort(key=lambda r: str(r.get("updated_at")), reverse=True)
    shown.sort(key=lambda r: r["state"] != "live")  # stable: the live ones first, newest first
    return shown


def _pool_map(workers: int, fn: Callable[[T], Any], items: Iterable[T]) -> list[Any]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def model_view(registry: Registry, model: str, workers: int = 8) -> ModelView | None:
    storage = registry.storage
    with reaching(f"the registry gs://{storage.bucket_name}/{layout.REGISTRY}{model}/"):
        numbers = registry.versions(model)
        if not numbers:
            return None
        found = _pool_map(workers, lambda v: registry.get(model, v), numbers)
        traffic, round_id = registry.traffic_round(model)
        serving = instance_states(
            registry.instances(model), dt.datetime.now(dt.UTC), traffic.shares()
        )
        instances: dict[str, dict[str, Any]] = {}
        succeeded = failed = 0
        if traffic.canary is not None and round_id:
            prefix = RegistryPaths(model).canary_counts(round_id)
            for path in storage.list(prefix):
                counts = storage.read_json(path) or {}
                instances[path[len(prefix) :]] = counts
                succeeded += int(counts.get("succeeded", 0))
                failed += int(counts.get("failed", 0))
    rows = []
    for mv in found:
        if mv is None:
            continue
        aliases = [alias for v, _, alias in traffic.shares() if v == mv.version]
        if mv.version == traffic.champion and CHAMPION not in aliases:
            aliases.append(CHAMPION)
        metrics = {
            k: float(v)
            for k, v in sorted((mv.info.get("metrics") or {}).items())
            if "[" not in k and isinstance(v, int | float)
        }
        rows.append(
            VersionRow(
                mv.version,
                mv.run_id,
                str(mv.info.get("registered_at", "")),
                metrics,
                "onnx" if mv.artifact("model.onnx") else "sklearn",
                aliases,
            )
        )
    return ModelView(
        name=model,
        versions=sorted(rows, key=lambda r: r.version, reverse=True),
        champion=traffic.champion,
        canary=traffic.canary,
        shares=traffic.shares(),
        history=traffic.history,
        canary_percent=traffic.canary_percent,
        promote_after=traffic.promote_after,
        canary_succeeded=succeeded,
        canary_failed=failed,
        instances=instances,
        serving=serving,
    )


def model_names(registry: Registry) -> list[str]:
    with reaching(f"the registry gs://{registry.storage.bucket_name}/{layout.REGISTRY}"):
        return registry.served_models()


# --- approvals --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PendingApproval:
    """A promotion into this environment that waits for `mlpipe approve` (docs/promotion.md)."""

    id: str
    model: str
    version: int
    from_env: str
    requested_by: str
    requested_at: dt.datetime
    expires_at: dt.datetime


def pending_approvals(storage: Storage, now: dt.datetime | None = None) -> list[PendingApproval]:
    """This environment's pending approval requests, the longest waiting first (expired and
    decided ones are not pending)."""
    with reaching(f"the approval requests gs://{storage.bucket_name}/{layout.APPROVALS}"):
        pending = Approvals(storage).pending(now or dt.datetime.now(dt.UTC))
    return [
        PendingApproval(
            r.id, r.model, r.version, r.from_env, r.requested_by, r.requested_at, r.expires_at
        )
        for r in pending
    ]


# --- failures ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FailuresView:
    dead_letters: list[kept_failures.Failure]
    quarantined: list[kept_failures.Failure]
    previews: dict[str, str]
    unavailable: list[Unavailable]


def failures_view(
    storage: Storage, project: str, probe: BucketProbe | None = None, preview_bytes: int = 2048
) -> FailuresView:
    """Dead letters and quarantined inputs, each with the start of what was kept; a source
    that cannot be reached is named in `unavailable` and the other one still shown."""
    missing: list[Unavailable] = []
    letters: list[kept_failures.Failure] = []
    kept: list[kept_failures.Failure] = []
    previews: dict[str, str] = {}
    try:
        with reaching(f"Pub/Sub ({kept_failures.DEAD_LETTER_ARCHIVE} in {project})"):
            letters = kept_failures.dead_letters(project)
    except Unavailable as exc:
        missing.append(exc)
    try:
        if probe is not None:
            probe.check()
        with reaching(f"the bucket gs://{storage.bucket_name} ({layout.QUARANTINE})"):
            kept = kept_failures.quarantined(storage)
            for item in kept:
                previews[item.id] = kept_failures.preview_quarantined(
                    storage, item.id, preview_bytes
                )
    except Unavailable as exc:
        missing.append(exc)
    for letter in letters:
        previews[letter.id] = letter.preview
    return FailuresView(letters, kept, previews, missing)


# --- drift and batches ------------------------------------------------------------------------
def drift_checks(storage: Storage, models: list[str]) -> list[dict[str, Any]]:
    """Every drift check of `models`, newest first: the check's summary (drift.json) with
    where its page and event are."""
    found = []
    with reaching(f"the bucket gs://{storage.bucket_name} ({layout.MONITORING})"):
        for model in models:
            prefix = f"{layout.monitoring_prefix(model)}reports/"
            for name in storage.list(prefix):
                if not name.endswith("/drift.json"):
                    continue
                check_id = name[len(prefix) :].split("/", 1)[0]
                summary = storage.read_json(name) or {}
                paths = DriftCheckPaths(model, check_id)
                found.append(
                    {
                        **summary,
                        "model": summary.get("model", model),
                        "check_id": check_id,
                        "page_path": paths.page,
                        "event_path": paths.event,
                    }
                )
    return sorted(found, key=lambda c: str(c.get("checked_at", "")), reverse=True)


def batch_runs(storage: Storage, models: list[str]) -> list[dict[str, Any]]:
    """Every batch prediction of `models` whose metrics exist (it is done), newest first."""
    found = []
    with reaching(f"the bucket gs://{storage.bucket_name} ({layout.PREDICTIONS})"):
        for model in models:
            prefix = f"{layout.PREDICTIONS}{model}/metrics/"
            for name in storage.list(prefix):
                metrics = storage.read_json(name) or {}
                batch_id = str(metrics.get("batch_id") or name.rsplit("/", 1)[-1][:-5])
                # Its estimate (run_cost.record_batch_estimate), once the predictor recorded it.
                cost = storage.read_json(layout.batch_cost_path(model, batch_id))
                found.append({"model": model, "metrics_path": name, **metrics, "cost": cost})
    return sorted(found, key=lambda b: str(b.get("finished_at", "")), reverse=True)


# Prefixes whose objects the console serves as downloads (a run's artifacts, drift pages,
# batch outputs and metrics); nothing else in the bucket.
READABLE_PREFIXES = (layout.RUNS, layout.MONITORING, layout.PREDICTIONS, layout.QUARANTINE)


def readable(path: str) -> bool:
    return path.startswith(READABLE_PREFIXES) and ".." not in path.split("/")
