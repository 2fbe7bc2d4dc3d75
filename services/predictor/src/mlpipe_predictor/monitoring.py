"""What the predictor records about its traffic, off the request path.

- `ServingMetrics`: request and error counts and a latency histogram per model version, in
  Prometheus' text format on `GET /metrics`, through prometheus_client (a registry per app,
  no `_created` series: the names and labels are those dashboards already read). Updated on
  the event loop (the predict routes run there).
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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from mlpipe.ml.scoring import LoadedModel
from mlpipe.store import layout
from mlpipe.store.storage import Storage

log = logging.getLogger(__name__)

# Seconds; the predictor answers one row in ~0.2 ms, batches take longer.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# A `<name>_created` series per counter would be a name no dashboard reads (process-wide
# switch; the predictor's registry is its only user).
disable_created_metrics()

# (metric, help text, snapshot key) of the per-version counters.
COUNTERS = (
    ("mlpipe_predict_requests_total", "Predict requests answered.", "requests"),
    ("mlpipe_predict_errors_total", "Predict requests answered with an error.", "errors"),
    ("mlpipe_predict_instances_total", "Instances scored.", "instances"),
)
LATENCY = "mlpipe_predict_latency_seconds"
LOG_RECORDS = "mlpipe_prediction_log_records_total"


@dataclass
class _Series:
    """One model version's children of the metrics (looked up once, not per request)."""

    requests: Counter
    errors: Counter
    instances: Counter
    latency: Histogram


class _LogCounts(Collector):
    """The prediction log's own counts (a dict it keeps), read when /metrics is scraped."""

    def __init__(self) -> None:
        self.counts: dict[str, int] | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        if self.counts is None:
            return
        family = CounterMetricFamily(
            LOG_RECORDS, "Prediction log records by outcome.", labels=["outcome"]
        )
        for outcome, count in sorted(self.counts.items()):
            family.add_metric([outcome], count)
        yield family


class ServingMetrics:
    """The predictor's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        self._counters = {
            key: Counter(name, what, labels, registry=self.registry) for name, what, key in COUNTERS
        }
        self._latency = Histogram(
            LATENCY,
            "Time to answer a predict request.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._log_counts = _LogCounts()
        self.registry.register(self._log_counts)
        self._series: dict[tuple[str, str], _Series] = {}

    def _children(self, model: str, version: str) -> _Series:
        series = self._series.get((model, version))
        if series is None:
            child = {key: c.labels(model, version) for key, c in self._counters.items()}
            series = self._series[(model, version)] = _Series(
                requests=child["requests"],
                errors=child["errors"],
                instances=child["instances"],
                latency=self._latency.labels(model, version),
            )
        return series

    def observe(self, model: str, version: str, seconds: float, ok: bool, instances: int) -> None:
        series = self._children(model, version)
        series.requests.inc()
        series.instances.inc(instances)
        if not ok:
            series.errors.inc()
        series.latency.observe(seconds)

    def _value(self, name: str, model: str, version: str) -> float:
        value = self.registry.get_sample_value(name, {"model": model, "version": version})
        return value or 0.0

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per `model/version`: requests, errors, instances, mean latency (for `mlpipe status`)."""
        out = {}
        for model, version in sorted(self._series):
            counts = {key: int(self._value(name, model, version)) for name, _, key in COUNTERS}
            total = self._value(f"{LATENCY}_sum", model, version)
            requests = counts["requests"]
            out[f"{model}/{version}"] = {
                **counts,
                "mean_latency_ms": round(1000 * total / requests, 3) if requests else 0,
            }
        return out

    def render(self, log_counts: dict[str, int] | None = None) -> str:
        """Prometheus' text format (0.0.4) of every series, and the prediction log's counts."""
        self._log_counts.counts = log_counts
        return generate_latest(self.registry).decode()


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
