"""Rollout steps a person (or the predictor) asks for: promote the canary, roll back.

Each step moves the registry's aliases (compare-and-swap, so racing steps never both win),
makes the target match, and is published as a DeploymentCompleted with the new split.
"""

from __future__ import annotations

import logging

from mlpipe.messaging.rollout import rollout_event
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.v1 import events_pb2
from mlpipe_deployer.deployment import Deployer

log = logging.getLogger(__name__)


def _apply_and_publish(
    deps: Deployer,
    model: str,
    version: int,
    previous: int | None,
    action: str,
    requested_by: str,
    reason: str,
) -> events_pb2.DeploymentCompleted:
    registry: Registry = deps.registry
    traffic = registry.traffic(model)
    versions = {v: mv for v, _, _ in traffic.shares() if (mv := registry.get(model, v))}
    resource = deps.target.apply(model, traffic, versions).resource
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
        target_resource=resource,
        reason=reason,
    )
    deps.publisher.publish(event)
    log.info("%s %s: v%d serves 100%% (was v%s)", action, model, version, previous)
    return event


def promote(
    deps: Deployer, model: str, requested_by: str, expected: int | None = None
) -> events_pb2.DeploymentCompleted:
    """The canary becomes the champion with 100% of the traffic. Raises RolloutError."""
    version, previous = deps.registry.promote(model, expected)
    return _apply_and_publish(
        deps, model, version, previous, "promote", requested_by, f"canary v{version} promoted"
    )


def rollback(deps: Deployer, model: str, requested_by: str) -> events_pb2.DeploymentCompleted:
    """Stop a running canary, or put the previous champion back. Raises RolloutError."""
    version, removed, what = deps.registry.rollback(model)
    reason = (
        f"canary v{removed} stopped; v{version} keeps 100%"
        if what != CHAMPION
        else f"champion v{removed} rolled back to v{version}"
    )
    return _apply_and_publish(deps, model, version, removed, "rollback", requested_by, reason)
