"""The predictor's push step and its batch jobs.

DeploymentCompleted → reload the model's versions (hot swap). BatchPredictionRequest (the same
push route, told apart by its subscription or the event_type attribute) → a batch job in a
background thread: long work never runs inside a push request. The delivery is acknowledged
only once the job is done (its metrics exist): while it runs each redelivery answers 503, so a
job lost with its process is started again, and a failed job is quarantined like any bad input.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from mlpipe.errors import Held, PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.push import PushMessage
from mlpipe.messaging.topology import BATCH_PUSH
from mlpipe.runtime.steps import StepResult, decode_message
from mlpipe.store import layout
from mlpipe.store.storage import Storage
from mlpipe.v1 import events_pb2
from mlpipe_predictor.batch import check_request, run_batch
from mlpipe_predictor.models import ModelStore

log = logging.getLogger(__name__)

BATCH_REQUEST = events_pb2.BatchPredictionRequest.DESCRIPTOR.full_name


@dataclass
class BatchJobs:
    """Batch jobs of this process: started in threads, finished when their metrics exist."""

    storage: Storage
    store: ModelStore
    chunk_rows: int = 10_000
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
        except PermanentError as exc:
            state = {"state": "failed", "reason": exc.reason, "error": exc.message}
        except Exception as exc:
            log.exception("batch %s failed", request.batch_id)
            state = {"state": "failed", "reason": "internal", "error": f"{exc}"}
        with self._lock:
            self._running[key] = {"batch_id": request.batch_id, **state}

    def forget(self, model: str, batch_id: str) -> None:
        with self._lock:
            self._running.pop(f"{model}/{batch_id}", None)

    def status(self, model: str, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            running = self._running.get(f"{model}/{batch_id}")
        if running is not None and running.get("state") != "succeeded":
            return running
        done = self.storage.read_json(layout.batch_metrics_path(model, batch_id))
        return {"state": "succeeded", **done} if done is not None else running


@dataclass
class PredictorStep:
    store: ModelStore
    jobs: BatchJobs

    def __call__(self, message: PushMessage) -> StepResult:
        if (
            message.subscription_name == BATCH_PUSH
            or message.attributes.get(events.EVENT_TYPE_ATTR) == BATCH_REQUEST
        ):
            return self._batch(decode_message(events_pb2.BatchPredictionRequest, message))
        done = decode_message(events_pb2.DeploymentCompleted, message)
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

    def _batch(self, request: events_pb2.BatchPredictionRequest) -> StepResult:
        check_request(request)
        state = self.jobs.status(request.model_name, request.batch_id)
        if state is None:
            state = self.jobs.start(request)
        elif state.get("state") == "failed":
            # Reported once; a replay after a fix starts the job again.
            self.jobs.forget(request.model_name, request.batch_id)
        if state.get("state") == "failed":
            raise PermanentError(
                f"batch_{state.get('reason', 'failed')}",
                f"batch {request.batch_id} of {request.model_name} failed: {state.get('error')}",
            )
        if state.get("state") != "succeeded":
            raise Held(
                f"batch {request.batch_id} of {request.model_name} is still running; "
                "acknowledged when its metrics are written"
            )
        return StepResult(
            "succeeded",
            {
                "batch_id": request.batch_id,
                "rows": state.get("rows"),
                "output_uri": state.get("output_uri"),
            },
        )
