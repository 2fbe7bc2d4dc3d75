"""Rollout steps a person (or the predictor) asks for: promote the canary, roll back.

Each step moves the registry's aliases (compare-and-swap, so racing steps never both win),
makes the target match, and is published as a DeploymentCompleted with the new split: at once
on a synchronous target, or when a later check finds a cloud target's rollout finished
(mlpipe_deployer.progress).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mlpipe.messaging.rollout import rollout_event
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.v1 import events_pb2
from mlpipe_deployer import progress
from mlpipe_deployer.deployment import Deployer

log = logging.getLogger(__name__)


@dataclass
class RolloutStep:
    """A promotion or rollback: its DeploymentCompleted (published once `operations` is
    empty), and the target's operations still running."""

    event: events_pb2.DeploymentCompleted
    operations: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return not self.operations


def _apply_and_publish(
    deps: Deployer,
    model: str,
    version: int,
    previous: int | None,
    action: str,
    requested_by: str,
    reason: str,
) -> RolloutStep:
    registry: Registry = deps.registry
    event = rollout_event(
        registry,
        model,
        version,
        action=action,
        alias=CHAMPION,
        previous_version=previous,
        target=deps.target.name,
        requested_by=requested_by,
        producer="deployer",
        code_version=deps.code_version,
        reason=reason,
    )
    advanced = progress.advance(deps, model, event)
    if not advanced.finished:
        log.info("%s %s: v%d rolling out (was v%s)", action, model, version, previous)
        return RolloutStep(event, advanced.rollout.operations)
    published = advanced.published[-1] if advanced.published else event
    log.info("%s %s: v%d serves 100%% (was v%s)", action, model, version, previous)
    return RolloutStep(published)


def promote(
    deps: Deployer, model: str, requested_by: str, expected: int | None = None
) -> RolloutStep:
    """The canary becomes the champion with 100% of the traffic. Raises RolloutError."""
    version, previous = deps.registry.promote(model, expected)
    return _apply_and_publish(
        deps, model, version, previous, "promote", requested_by, f"canary v{version} promoted"
    )


def rollback(deps: Deployer, model: str, requested_by: str) -> RolloutStep:
    """Stop a running canary, or put the previous champion back. Raises RolloutError."""
    version, removed, what = deps.registry.rollback(model)
    reason = (
        f"canary v{removed} stopped; v{version} keeps 100%"
        if what != CHAMPION
        else f"champion v{removed} rolled back to v{version}"
    )
    return _apply_and_publish(deps, model, version, removed, "rollback", requested_by, reason)
