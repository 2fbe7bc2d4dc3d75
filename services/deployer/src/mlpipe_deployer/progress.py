"""Rollouts that outlast a push request: the deployer's side of a target's long-running operations.

A target's `apply` takes one step and returns the names of the operations it started (see
mlpipe_deployer.targets). While any run, the model has a record, `rollouts/<model>.json`
(mlpipe.store.layout.rollout_path): those operation names, and the DeploymentCompleted events
waiting for the rollout to finish. The push that started it is acknowledged at once. Each later
`advance` (a redelivery, `POST /v1/rollouts:check` from Cloud Scheduler, the deployer's own
timer on a local stack) hands the recorded operations back to `apply`, which starts the next
step once they are done. When `apply` reports nothing running, the waiting events are recorded
(`runs/<run_id>/deployment.json`) and published, and the record is deleted.

Nothing here knows which target it drives: only `Rollout.operations`, `Rollout.error` and
`Rollout.resource`. A synchronous target (local) is done on the first call: no record is
written, and the event is recorded and published exactly as before.

Every write of a record carries a generation precondition: two deliveries racing on one model
never both move its record (the loser answers 503 and its retry reads the winner's record).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc

from mlpipe.errors import TransientError
from mlpipe.faults import fault_point
from mlpipe.messaging import events
from mlpipe.store import layout, run_cost
from mlpipe.v1 import events_pb2
from mlpipe_deployer.targets import Rollout

log = logging.getLogger(__name__)


@dataclass
class Advanced:
    """What one `advance` did: the target's answer, and the events it recorded and published
    (only once the rollout is finished)."""

    rollout: Rollout
    published: list[events_pb2.DeploymentCompleted] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return not self.rollout.operations

    def for_run(self, run_id: str) -> events_pb2.DeploymentCompleted | None:
        return next((e for e in self.published if e.context.run_id == run_id), None)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _waiting(event: events_pb2.DeploymentCompleted, run_id: str) -> dict[str, Any]:
    return {"run_id": run_id, "event": json.loads(events.to_json(event))}


def advance(
    deps: Any,
    model: str,
    event: events_pb2.DeploymentCompleted | None = None,
    run_id: str = "",
) -> Advanced:
    """Take `model`'s rollout one step towards the registry's traffic; `event` (for the run
    `run_id`, if any) is published once the rollout is finished. A run already waiting is not
    added twice."""
    path = layout.rollout_path(model)
    found = deps.storage.read(path)
    record: dict[str, Any] | None = found.json() if found is not None else None
    generation = found.generation if found is not None else 0
    running = list(record["operations"]) if record else []
    waiting: list[dict[str, Any]] = list(record["waiting"]) if record else []
    if event is not None and not (run_id and any(w["run_id"] == run_id for w in waiting)):
        waiting.append(_waiting(event, run_id))

    traffic = deps.registry.traffic(model)
    versions = {v: mv for v, _, _ in traffic.shares() if (mv := deps.registry.get(model, v))}
    rollout = deps.target.apply(model, traffic, versions, running)

    if rollout.operations and not rollout.error:
        updated = {
            "model": model,
            "target": deps.target.name,
            "operations": rollout.operations,
            "resource": rollout.resource,
            "waiting": waiting,
            "started": record["started"] if record else _now(),
            "updated": _now(),
        }
        try:
            deps.storage.write_json(path, updated, if_generation_match=generation)
        except gexc.PreconditionFailed:
            raise TransientError(f"the rollout of {model} moved meanwhile; retry") from None
        log.info("rollout of %s: waiting for %s", model, ", ".join(rollout.operations))
        return Advanced(rollout)

    finished = []
    for entry in waiting:
        done = events.from_json(events_pb2.DeploymentCompleted, json.dumps(entry["event"]))
        if rollout.error:
            done.deployed = False
            done.reason = f"rollout failed: {rollout.error}"
        else:
            done.target_resource = rollout.resource
        if entry["run_id"]:
            recorded_at = layout.RunPaths(entry["run_id"]).deployment
            if deps.storage.create_if_absent(recorded_at, events.to_json(done).encode()) is None:
                recorded = deps.storage.read(recorded_at)
                if recorded is not None:
                    done = events.from_json(events_pb2.DeploymentCompleted, recorded.data)
        finished.append(done)
    if found is not None:
        try:
            deps.storage.delete(path, if_generation_match=generation)
        except gexc.PreconditionFailed:
            # Another delivery moved the record: its events are in it, and it publishes them.
            return Advanced(Rollout(rollout.resource, running))
    if rollout.error:
        log.error("rollout of %s failed: %s", model, rollout.error)
    fault_point("deployer.before_publish")
    for done in finished:
        deps.publisher.publish(done)
    for entry in waiting:
        if entry["run_id"]:
            record_cost(deps, entry["run_id"])
    return Advanced(rollout, finished)


def record_cost(deps: Any, run_id: str) -> None:
    """The decided run has ended: record its cost estimate (runs/<id>/cost.json) unless it
    is recorded. Never fails the delivery (run_cost.record_estimate; readers estimate a run
    without one on read)."""
    try:
        if deps.storage.exists(layout.RunPaths(run_id).cost):
            return
    except Exception as exc:  # the decision stands either way
        log.warning("run %s: cost estimate not recorded: %r", run_id, exc)
        return
    run_cost.record_estimate(
        deps.storage,
        run_id,
        sizes_json=deps.cost_sizes,
        prices_json=deps.prices,
        by="deployer",
    )


def check_all(deps: Any) -> list[dict[str, Any]]:
    """Advance every rollout that has a record; what each one did."""
    out = []
    for model in layout.rollout_models(deps.storage.list(layout.ROLLOUTS)):
        advanced = advance(deps, model)
        out.append(
            {
                "model": model,
                "finished": advanced.finished,
                "operations": advanced.rollout.operations,
                "error": advanced.rollout.error,
                "published": len(advanced.published),
            }
        )
    return out
