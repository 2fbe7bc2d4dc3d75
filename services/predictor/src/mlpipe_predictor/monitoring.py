"""What the predictor records about its traffic, off the request path.

- `ServingMetrics`: request and error counts and a latency histogram per model version, in
  Prometheus' text format on `GET /metrics`. Updated on the event loop only (the predict
  routes run there), so it needs no lock.
- `PredictionLog`: a sample of requests and their predictions, appended to a bounded buffer on
  the request path and written to GCS in batches by a background thread, as JSON lines under
  `monitoring/<model>/dt=YYYY-MM-DD/<HHMMSS>-<id>.jsonl`. A full buffer drops the record and
  counts it: serving never waits for storage. The drift check reads these files.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import math
import random
import threading
import time
import uuid
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from mlpipe.store import layout
from mlpipe.store.storage import Storage
from mlpipe_predictor.runtime import LoadedModel

log = logging.getLogger(__name__)

# Seconds; the predictor answers one row in ~0.2 ms, batches take longer.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class _Series:
    requests: int = 0
    errors: int = 0
    instances: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


# (metric, help text, _Series field) of the per-version counters.
COUNTERS = (
    ("mlpipe_predict_requests_total", "Predict requests answered.", "requests"),
    ("mlpipe_predict_errors_total", "Predict requests answered with an error.", "errors"),
    ("mlpipe_predict_instances_total", "Instances scored.", "instances"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServingMetrics:
    def __init__(self) -> None:
        self._series: dict[tuple[str, str], _Series] = {}

    def observe(self, model: str, version: str, seconds: float, ok: bool, instances: int) -> None:
        series = self._series.get((model, version))
        if series is None:
            series = self._series[(model, version)] = _Series()
        series.requests += 1
        series.instances += instances
        if not ok:
            series.errors += 1
        series.latency_sum += seconds
        series.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per `model/version`: requests, errors, instances, mean latency (for `mlpipe status`)."""
        return {
            f"{model}/{version}": {
                "requests": s.requests,
                "errors": s.errors,
                "instances": s.instances,
                "mean_latency_ms": round(1000 * s.latency_sum / s.requests, 3) if s.requests else 0,
            }
            for (model, version), s in sorted(self._series.items())
        }

    def render(self, log_counts: dict[str, int] | None = None) -> str:
        items = sorted(self._series.items())
        lines: list[str] = []
        for metric, what, field_name in COUNTERS:
            lines += [f"# HELP {metric} {what}", f"# TYPE {metric} counter"]
            for (model, version), s in items:
                lines.append(
                    f'{metric}{{model="{_label(model)}",version="{version}"}} '
                    f"{getattr(s, field_name)}"
                )
        lines += [
            "# HELP mlpipe_predict_latency_seconds Time to answer a predict request.",
            "# TYPE mlpipe_predict_latency_seconds histogram",
        ]
        for (model, version), s in items:
            labels = f'model="{_label(model)}",version="{version}"'
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS, math.inf), s.buckets, strict=True):
                cumulative += count
                le = "+Inf" if bound == math.inf else f"{bound:g}"
                lines.append(
                    f'mlpipe_predict_latency_seconds_bucket{{{labels},le="{le}"}} {cumulative}'
                )
            lines.append(f"mlpipe_predict_latency_seconds_sum{{{labels}}} {s.latency_sum:.6f}")
            lines.append(f"mlpipe_predict_latency_seconds_count{{{labels}}} {s.requests}")
        if log_counts is not None:
            lines += [
                "# HELP mlpipe_prediction_log_records_total Prediction log records by outcome.",
                "# TYPE mlpipe_prediction_log_records_total counter",
            ]
            for outcome, count in sorted(log_counts.items()):
                lines.append(f'mlpipe_prediction_log_records_total{{outcome="{outcome}"}} {count}')
        return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """JSON-safe scalar (numpy scalars, NaN as null)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class PredictionLog:
    """A sampled, bounded, batched log of served requests; see the module docstring."""

    def __init__(
        self,
        storage: Storage,
        rate: float = 1.0,
        capacity: int = 50_000,
        batch_records: int = 5_000,
        flush_seconds: float = 5.0,
    ) -> None:
        self.storage = storage
        self.rate = rate
        self.capacity = capacity
        self.batch_records = batch_records
        self.flush_seconds = flush_seconds
        self._buffer: collections.deque[tuple[float, LoadedModel, Any, list[Any]]] = (
            collections.deque()
        )
        self.counts = {"sampled": 0, "dropped": 0, "written": 0, "write_failed": 0}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the request path: an append, or a count -------------------------------------------
    def record(self, model: LoadedModel, instances: Any, predictions: list[Any]) -> None:
        if self.rate <= 0 or (self.rate < 1 and random.random() >= self.rate):
            return
        if len(self._buffer) >= self.capacity:
            self.counts["dropped"] += len(predictions)
            return
        self._buffer.append((dt.datetime.now(dt.UTC).timestamp(), model, instances, predictions))
        self.counts["sampled"] += len(predictions)
        if len(self._buffer) >= self.batch_records:
            self._wake.set()

    # --- the background writer -------------------------------------------------------------
    def start(self) -> None:
        if self.rate > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="prediction-log", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is buffered and stop the writer (on shutdown)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Write every buffered record (one object per model and day); return how many."""
        taken: list[tuple[float, LoadedModel, Any, list[Any]]] = []
        while self._buffer:
            try:
                taken.append(self._buffer.popleft())
            except IndexError:
                break
        if not taken:
            return 0
        files: dict[tuple[str, dt.date], list[str]] = collections.defaultdict(list)
        for n, (stamp, model, instances, predictions) in enumerate(taken):
            if n % 64 == 63:
                # Hand the GIL back to the event loop often: a flush of thousands of records
                # would otherwise hold it for whole switch intervals (5 ms) at a time.
                time.sleep(0)
            when = dt.datetime.fromtimestamp(stamp, dt.UTC)
            names = [f.name for f in model.schema]
            for instance, prediction in zip(instances, predictions, strict=False):
                features = (
                    {k: _plain(instance.get(k)) for k in names}
                    if isinstance(instance, dict)
                    else {k: _plain(v) for k, v in zip(names, instance, strict=False)}
                )
                label = prediction.get("label") if isinstance(prediction, dict) else prediction
                files[(model.name, when.date())].append(
                    json.dumps(
                        {
                            "time": when.isoformat(),
                            "model": model.name,
                            "version": model.version,
                            "instance": features,
                            "prediction": _plain(label),
                        },
                        separators=(",", ":"),
                    )
                )
        written = 0
        for (model_name, day), lines in files.items():
            hms = dt.datetime.now(dt.UTC).strftime("%H%M%S")
            path = layout.prediction_log_path(model_name, day, f"{hms}-{uuid.uuid4().hex[:12]}")
            try:
                self.storage.write(
                    path, ("\n".join(lines) + "\n").encode(), content_type="application/x-ndjson"
                )
                written += len(lines)
            except Exception:
                # Monitoring data is best effort; serving is not. Count it and say so.
                self.counts["write_failed"] += len(lines)
                log.warning("could not write %d prediction log records to %s", len(lines), path)
        self.counts["written"] += written
        return written
