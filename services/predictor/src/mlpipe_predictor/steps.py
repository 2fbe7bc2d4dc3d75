"""The predictor's push step and its batch jobs.

DeploymentCompleted → reload the model's versions (hot swap). BatchPredictionRequest (the same
push route, told apart by its subscription or the event_type attribute) → a batch, on the step
protocol (mlpipe.runtime.steps.run_step):

    skip if its BatchPredictionCompleted is recorded (re-publish it)
    → claim: the metrics exist → go on; else start its work once and answer `held`
      (503: the delivery comes back, with Pub/Sub's backoff, until the metrics exist)
    → work: the BatchPredictionCompleted its metrics describe → record → publish

Its work is a batch job (mlpipe_batch, Apache Beam; mlpipe_predictor.launch) launched once
per batch_id through its job record; an input of at most `inline_max_bytes` (one object) is
scored in a background thread of this process instead (mlpipe_predictor.batch), where a
job's start-up would cost more than the scoring. Long work never runs inside a push request.
A failed batch is a permanent outcome: PipelineFailed, the request kept in quarantine.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.batch_jobs import REJECT_BATCH, JobSpec, completed_event
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage
from mlpipe.runtime.steps import (
    Recorded,
    Router,
    StepResult,
    held,
    permanent,
    run_step,
)
from mlpipe.store import layout, run_cost
from mlpipe.store.registry import CHAMPION
from mlpipe.store.storage import Storage
from mlpipe.v1 import events_pb2
from mlpipe_predictor.batch import check_request, run_batch
from mlpipe_predictor.champion_scoring import ChampionScoring
from mlpipe_predictor.launch import JobLaunch
from mlpipe_predictor.models import ModelStore

log = logging.getLogger(__name__)

BATCH_REQUEST = events_pb2.BatchPredictionRequest.DESCRIPTOR.full_name
DEPLOYMENT_COMPLETED = events_pb2.DeploymentCompleted.DESCRIPTOR.full_name


@dataclass
class BatchJobs:
    """Batch jobs of this process: started in threads, finished when their metrics exist."""

    storage: Storage
    store: ModelStore
    chunk_rows: int = 10_000
    # Sizes and prices (MLPIPE_COST_SIZES, MLPIPE_PRICES) of a finished batch's estimate.
    cost_sizes: str = ""
    prices: str = ""
    _running: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, request: events_pb2.BatchPredictionRequest) -> dict[str, Any]:
        """Start scoring (or say it is running or done); raise PermanentError if invalid."""
        check_request(request)
        key = f"{request.model_name}/{request.batch_id}"
        done = self.storage.read_json(
            layout.batch_metrics_path(request.model_name, request.batch_id)
        )
        if done is not None:
            return {"state": "succeeded", **done}
        with self._lock:
            if self._running.get(key, {}).get("state") == "running":
                return self._running[key]
            self._running[key] = {"state": "running", "batch_id": request.batch_id}
        threading.Thread(target=self._run, args=(key, request), daemon=True).start()
        return self._running[key]

    def _run(self, key: str, request: events_pb2.BatchPredictionRequest) -> None:
        loaded = next(
            (m for m in self.store.versions_of(request.model_name) if m.version == request.version),
            None,
        )
        try:
            metrics = run_batch(
                self.storage,
                self.store.registry,
                request,
                loaded=loaded,
                default_chunk_rows=self.chunk_rows,
            )
            state: dict[str, Any] = {"state": "succeeded", **metrics}
            self.record_cost(request.model_name, request.batch_id)
        except PermanentError as exc:
            state = {"state": "failed", "reason": exc.reason, "error": exc.message}
        except Exception as exc:
            log.exception("batch %s failed", request.batch_id)
            state = {"state": "failed", "reason": "internal", "error": f"{exc}"}
        with self._lock:
            self._running[key] = {"batch_id": request.batch_id, **state}

    def record_cost(self, model: str, batch_id: str) -> None:
        """The finished batch's estimate (run_cost.record_batch_estimate; never raises)."""
        run_cost.record_batch_estimate(
            self.storage, model, batch_id, sizes_json=self.cost_sizes, prices_json=self.prices
        )

    def forget(self, model: str, batch_id: str) -> None:
        with self._lock:
            self._running.pop(f"{model}/{batch_id}", None)

    def status(self, model: str, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            running = self._running.get(f"{model}/{batch_id}")
        if running is not None and running.get("state") != "succeeded":
            return running
        done = self.storage.read_json(layout.batch_metrics_path(model, batch_id))
        if done is None:
            return running
        cost = self.storage.read_json(layout.batch_cost_path(model, batch_id))
        return {"state": "succeeded", **done} | ({"cost": cost} if cost is not None else {})


@dataclass
class BatchStep:
    """A BatchPredictionRequest on the step protocol (see the module's doc)."""

    storage: Storage
    publisher: Publisher
    jobs: BatchJobs
    launch: JobLaunch
    code_version: str = "dev"
    inline_max_bytes: int = 8 * 1024 * 1024
    bad_rows: str = REJECT_BATCH  # when the request does not say

    def __call__(self, request: events_pb2.BatchPredictionRequest) -> StepResult:
        run_id = request.context.run_id
        try:
            check_request(request)
        except PermanentError as exc:
            return permanent(exc, run_id)
        model, batch_id = request.model_name, request.batch_id
        result = run_step(
            storage=self.storage,
            publisher=self.publisher,
            stage="predictor",
            run_id=run_id,
            skip=Recorded(
                layout.batch_completed_path(model, batch_id), events_pb2.BatchPredictionCompleted
            ),
            claim=lambda: self._claim(request),
            work=lambda: self._completed(request),
            done=lambda event: StepResult(
                "succeeded",
                {
                    "batch_id": event.batch_id,
                    "rows": event.rows,
                    "output_uri": event.output_uris[0] if len(event.output_uris) == 1 else "",
                    "output_uris": list(event.output_uris),
                    "runner": event.runner,
                },
                run_id,
            ),
        )
        if result.status in ("succeeded", "duplicate"):
            self.jobs.record_cost(model, batch_id)
        return result

    def _completed(
        self, request: events_pb2.BatchPredictionRequest
    ) -> events_pb2.BatchPredictionCompleted:
        path = layout.batch_metrics_path(request.model_name, request.batch_id)
        metrics = self.storage.read_json(path)
        if metrics is None:  # the claim saw them: only a deletion since could do this
            raise PermanentError("metrics_missing", f"{self.storage.uri(path)} disappeared")
        return completed_event(
            {"metrics_uri": self.storage.uri(path), **metrics},
            context=request.context,
            producer="predictor",
            code_version=self.code_version,
        )

    def _claim(self, request: events_pb2.BatchPredictionRequest) -> StepResult | None:
        """None once the metrics exist; else start (or follow) the batch's work: held."""
        model, batch_id = request.model_name, request.batch_id
        if self.storage.exists(layout.batch_metrics_path(model, batch_id)):
            return None
        job = self.storage.read_json(layout.batch_job_path(model, batch_id))
        if job is None and self._inline(request):
            return self._in_process(request)
        spec = JobSpec.from_json(job["spec"]) if job else self._spec(request)
        return self.launch.follow(spec)

    def _inline(self, request: events_pb2.BatchPredictionRequest) -> bool:
        path = self.storage.path_of(request.input_uri)
        if any(c in path for c in "*?[") or path.endswith(".avro"):
            return False  # many objects, or Avro: only the job reads them
        blob = self.storage.bucket.get_blob(path)
        if blob is None:
            raise PermanentError("dataset_missing", f"{request.input_uri} does not exist")
        return int(blob.size or 0) <= self.inline_max_bytes

    def _in_process(self, request: events_pb2.BatchPredictionRequest) -> StepResult | None:
        state = self.jobs.status(request.model_name, request.batch_id)
        if state is None:
            state = self.jobs.start(request)
        elif state.get("state") == "failed":
            # Reported once; a replay after a fix starts the job again.
            self.jobs.forget(request.model_name, request.batch_id)
            raise PermanentError(
                f"batch_{state.get('reason', 'failed')}",
                f"batch {request.batch_id} of {request.model_name} failed: {state.get('error')}",
            )
        if state.get("state") == "succeeded":
            return None
        return held(
            f"batch {request.batch_id} of {request.model_name} is still running; "
            "acknowledged when its metrics are written",
            request.context.run_id,
        )

    def _spec(self, request: events_pb2.BatchPredictionRequest) -> JobSpec:
        """The job's spec, its version resolved now (the champion when the request names
        none): the version that does not exist is rejected here, before any job starts."""
        registry = self.jobs.store.registry
        model = request.model_name
        version = int(request.version or registry.alias(model, CHAMPION) or 0)
        if not version:
            raise PermanentError("no_model", f"{model} has no champion to score with")
        if registry.get(model, version) is None:
            raise PermanentError(
                "unknown_model_version", f"{model} version {version} is not in the registry"
            )
        now = dt.datetime.now(dt.UTC)
        return JobSpec(
            project=self.publisher.project,
            bucket=self.storage.bucket_name,
            batch_id=request.batch_id,
            model=model,
            version=version,
            input_uri=request.input_uri,
            output_prefix=layout.batch_job_output_prefix(model, now.date(), request.batch_id),
            key_column=request.key_column,
            chunk_rows=int(request.chunk_rows or self.jobs.chunk_rows),
            bad_rows=events.BAD_ROW_POLICY.text(request.bad_rows, self.bad_rows),
            code_version=self.code_version,
            request=events.to_json(request),
            launched_at=now.isoformat(),
        )


@dataclass
class PredictorStep:
    store: ModelStore
    batch: BatchStep
    # A new champion's scoring of the next days (mlpipe_predictor.champion_scoring).
    scoring: ChampionScoring | None = None

    def __call__(self, message: PushMessage) -> StepResult:
        return Router(
            {
                BATCH_REQUEST: lambda request, m: self.batch(request),
                DEPLOYMENT_COMPLETED: lambda done, m: self.deployed(done),
            },
            DEPLOYMENT_COMPLETED,
        )(message)

    def deployed(self, done: events_pb2.DeploymentCompleted) -> StepResult:
        """Reload, then (a full champion whose pipeline has `scoring:`) request its scoring."""
        served = self.reload(done)
        if self.scoring is None:
            return served
        try:
            scored = self.scoring(done)
        except PermanentError as exc:
            exc.context = exc.context or done.context
            exc.dataset = exc.dataset or done.dataset
            return permanent(exc, done.context.run_id)
        if scored is None:
            return served
        return StepResult(
            served.status, {**served.detail, "scoring": scored.detail}, done.context.run_id
        )

    def reload(self, done: events_pb2.DeploymentCompleted) -> StepResult:
        """The pure step with no record: serve what the registry now says for the model."""
        if not done.deployed:
            return StepResult("ignored", {"reason": done.reason}, run_id=done.context.run_id)
        served = self.store.refresh(done.model_name)
        if served is None:
            return StepResult(
                "ignored",
                {
                    "model": done.model_name,
                    "reason": "not served here: no champion or canary in the registry, "
                    "or this predictor is pinned to another model",
                },
                run_id=done.context.run_id,
            )
        detail: dict[str, object] = {"model": done.model_name}
        if served.champion is not None:
            detail["version"] = served.champion.version
        if served.canary is not None:
            detail["canary"] = served.canary.version
        return StepResult("serving", detail, run_id=done.context.run_id)
