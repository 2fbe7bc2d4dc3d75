"""Cloud Run: one predictor service, a revision per served model version, traffic split
between them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.cloud import run_v2

from mlpipe.store.registry import ModelVersion, Traffic
from mlpipe_deployer.targets import SERVE_MODEL_ENV, SERVE_VERSION_ENV, Rollout, label_value


def revision_name(service: str, model: str, version: int) -> str:
    """A revision name Cloud Run accepts: '<service>-', then [a-z0-9-], at most 63 in all."""
    tail = f"-v{version}"
    room = max(0, 63 - len(service) - 1 - len(tail))
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower())[:room].strip("-")
    return f"{service}-{slug}{tail}" if slug else f"{service}{tail}"


def service_update(
    current: run_v2.Service,
    model: str,
    traffic: Traffic,
    versions: dict[int, ModelVersion],
    existing: Sequence[str],
    image: str,
    code_version: str,
) -> run_v2.UpdateServiceRequest:
    """The update that makes the predictor service split traffic as `traffic` says.

    A version without a revision yet gets one: the current template with the predictor
    image, pinned to that model version by environment variables, under a deterministic
    revision name (so a retried update never makes a second one). Versions that have a
    revision (a rollback, a promotion) only change the traffic list.
    """
    service_name = current.name.rsplit("/", 1)[-1]
    service = run_v2.Service.deserialize(run_v2.Service.serialize(current))
    shares = traffic.shares()
    new = [v for v, _, _ in shares if revision_name(service_name, model, v) not in existing]
    if len(new) > 1:
        raise ValueError(f"one new revision per rollout step, not {new}")
    if new:
        version = new[0]
        mv = versions[version]
        template = service.template
        template.revision = revision_name(service_name, model, version)
        template.labels.update(
            {
                "mlpipe-model": label_value(model),
                "mlpipe-version": str(version),
                "run_id": label_value(mv.run_id),
                "commit": label_value(code_version),
            }
        )
        container = template.containers[0] if template.containers else run_v2.Container()
        container.image = image
        pinned = {SERVE_MODEL_ENV: model, SERVE_VERSION_ENV: str(version)}
        kept = [e for e in container.env if e.name not in pinned]
        container.env = [*kept, *(run_v2.EnvVar(name=k, value=v) for k, v in pinned.items())]
        if not template.containers:
            template.containers = [container]
    service.traffic = [
        run_v2.TrafficTarget(
            type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
            revision=revision_name(service_name, model, version),
            percent=percent,
            tag=alias,
        )
        for version, percent, alias in shares
    ]
    return run_v2.UpdateServiceRequest(service=service)


@dataclass
class CloudRunTarget:
    project: str
    region: str
    service: str
    image: str
    code_version: str
    name: str = "cloud_run"
    services: Any = None
    revisions: Any = None

    @property
    def service_path(self) -> str:
        return f"projects/{self.project}/locations/{self.region}/services/{self.service}"

    def apply(
        self,
        model: str,
        traffic: Traffic,
        versions: dict[int, ModelVersion],
        running: Sequence[str] = (),
    ) -> Rollout:
        services = self.services or run_v2.ServicesClient()
        revisions = self.revisions or run_v2.RevisionsClient()
        current = services.get_service(name=self.service_path)
        existing = [
            r.name.rsplit("/", 1)[-1] for r in revisions.list_revisions(parent=self.service_path)
        ]
        request = service_update(
            current, model, traffic, versions, existing, self.image, self.code_version
        )
        services.update_service(request=request).result(timeout=540)
        split = ", ".join(f"{t.revision} {t.percent}%" for t in request.service.traffic)
        return Rollout(f"{self.service_path} ({split})")
