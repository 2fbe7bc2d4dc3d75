"""The DeploymentCompleted event of a rollout step, built from the registry's state: used by
the deployer (deployments, promotions, rollbacks) and by the predictor (a canary it promotes
by itself)."""

from __future__ import annotations

from google.protobuf import json_format

from mlpipe.messaging import events
from mlpipe.store.registry import Registry, Traffic
from mlpipe.v1 import events_pb2


def traffic_shares(traffic: Traffic) -> list[events_pb2.TrafficShare]:
    return [
        events_pb2.TrafficShare(version=v, percent=p, model_alias=events.MODEL_ALIAS.of(a))
        for v, p, a in traffic.shares()
    ]


def rollout_event(
    registry: Registry,
    model: str,
    version: int,
    *,
    action: str,
    alias: str,
    previous_version: int | None,
    target: str,
    requested_by: str,
    producer: str,
    code_version: str,
    target_resource: str = "",
    reason: str = "",
) -> events_pb2.DeploymentCompleted:
    """The DeploymentCompleted that records a rollout step (promote, rollback) of `version`,
    with the lineage of the run that made it and the model's traffic split after the step."""
    mv = registry.get(model, version)
    if mv is None:
        raise FileNotFoundError(f"{model} v{version} is not in the registry")
    dataset = events_pb2.DatasetRef()
    json_format.ParseDict(mv.info.get("dataset", {}), dataset, ignore_unknown_fields=True)
    context = events.context(
        producer=producer,
        code_version=code_version,
        run_id=mv.run_id,
        pipeline=dataset.name,
        config_sha256=str(mv.info.get("config_sha256", "")),
    )
    return events_pb2.DeploymentCompleted(
        context=context,
        dataset=dataset,
        model_name=model,
        version=version,
        model_alias=events.MODEL_ALIAS.of(alias),
        deployed=True,
        reason=reason,
        model_uri=mv.model_uri,
        model_sha256=mv.model_sha256,
        deploy_target=events.DEPLOY_TARGET.of(target),
        previous_version=previous_version or 0,
        runtime=str(mv.info.get("runtime", "sklearn")),
        runtime_note=str(mv.info.get("runtime_note", "")),
        rollout_action=events.ROLLOUT_ACTION.of(action),
        traffic=traffic_shares(registry.traffic(model)),
        target_resource=target_resource,
        requested_by=requested_by,
    )
