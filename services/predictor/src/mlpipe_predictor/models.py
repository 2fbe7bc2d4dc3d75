"""The predictor's models: loaded from the registry (sha256 verified), swapped atomically.

A swap replaces one dict entry under a lock; a request reads the entry once, so it is served
entirely by the old or entirely by the new version, never a mix.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import joblib
import numpy as np
import pandas as pd

from mlpipe import events
from mlpipe.errors import PermanentError
from mlpipe.push import PushMessage
from mlpipe.registry import CHAMPION, Registry
from mlpipe.service import StepResult
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)


class InvalidInstances(ValueError):
    """The request's instances cannot be scored; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    run_id: str
    sha256: str
    estimator: Any
    features: list[str]
    task: str

    def _frame(self, instances: list[Any]) -> pd.DataFrame:
        if not isinstance(instances, list) or not instances:
            raise InvalidInstances("'instances' must be a non-empty list")
        rows = []
        n = len(self.features)
        for i, inst in enumerate(instances):
            if isinstance(inst, dict):
                missing = [f for f in self.features if f not in inst]
                if missing:
                    raise InvalidInstances(f"instance {i} lacks feature(s) {missing}")
                row = [inst[f] for f in self.features]
            elif isinstance(inst, list):
                if len(inst) != n:
                    raise InvalidInstances(
                        f"instance {i} has {len(inst)} values; the model takes {n}: {self.features}"
                    )
                row = inst
            else:
                raise InvalidInstances(f"instance {i} must be a list or an object")
            for name, value in zip(self.features, row, strict=True):
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                if not ok or not math.isfinite(value):
                    raise InvalidInstances(
                        f"instance {i}: feature {name!r} must be a finite number, got {value!r}"
                    )
            rows.append(row)
        return pd.DataFrame(np.asarray(rows, dtype=float), columns=self.features)

    def predict(self, instances: list[Any]) -> list[Any]:
        frame = self._frame(instances)
        out = self.estimator.predict(frame)
        return [v.item() if hasattr(v, "item") else v for v in out]


def warm_up() -> None:
    """Import the estimator modules at start-up, not on the first deployment's request path."""
    import sklearn.ensemble
    import sklearn.linear_model
    import sklearn.pipeline  # noqa: F401


def load_version(registry: Registry, model: str, version: int) -> LoadedModel:
    mv = registry.get(model, version)
    if mv is None:
        raise FileNotFoundError(f"{model} version {version} is not in the registry")
    artifact = registry.load_artifact(mv)  # raises unless the sha256 matches
    bundle = joblib.load(io.BytesIO(artifact))
    return LoadedModel(
        model,
        version,
        mv.run_id,
        mv.model_sha256,
        bundle["estimator"],
        list(bundle["features"]),
        str(bundle["task"]),
    )


class ModelStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None) -> LoadedModel:
        models = self._models
        if name is None:
            if len(models) != 1:
                raise KeyError(
                    "name the model: this predictor serves " + (", ".join(models) or "none yet")
                )
            return next(iter(models.values()))
        return models[name]

    def served(self) -> dict[str, dict[str, Any]]:
        return {
            n: {"version": m.version, "run_id": m.run_id, "sha256": m.sha256}
            for n, m in self._models.items()
        }

    def load_champion(self, name: str) -> LoadedModel | None:
        version = self.registry.alias(name, CHAMPION)
        if version is None:
            return None
        current = self._models.get(name)
        if current is not None and current.version == version:
            return current
        loaded = load_version(self.registry, name, version)  # outside the lock: may be slow
        with self._lock:
            self._models = {**self._models, name: loaded}
        log.info("now serving %s version %d", name, version)
        return loaded

    def load_all(self) -> None:
        for name in self.registry.models():
            try:
                self.load_champion(name)
            except Exception:
                log.exception("could not load the champion of %s", name)


@dataclass
class DeploymentListener:
    store: ModelStore

    def __call__(self, message: PushMessage) -> StepResult:
        try:
            done = events.decode(
                events_pb2.DeploymentCompleted,
                message.data,
                message.attributes.get(events.SCHEMA_ENCODING_ATTR, ""),
            )
        except events.EventDecodeError as exc:
            raise PermanentError("invalid_message", str(exc)) from exc
        if not done.deployed:
            return StepResult("ignored", {"reason": done.reason}, run_id=done.context.run_id)
        loaded = self.store.load_champion(done.model_name)
        version = loaded.version if loaded else 0
        return StepResult(
            "serving", {"model": done.model_name, "version": version}, run_id=done.context.run_id
        )
