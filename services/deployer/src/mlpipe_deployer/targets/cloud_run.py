"""Cloud Run: one predictor service, a revision per served model version, traffic split
between them.

One predictor service serves one model: a request reaches one revision, and a revision is
pinned to one model version. Code releases and model rollouts share the service (docs/deploy.md,
"Cloud Run: code releases and model rollouts"):
- a code release (Cloud Build's `gcloud run deploy`, or Cloud Deploy) replaces the service's
  revision template: new image, the environment of infra/runtime.yaml, no model pinned;
- a model rollout never sets the image or the environment: it builds each served version's
  revision from the service's *current* template, adding only the two variables that pin the
  version. The revision's name carries a fingerprint of that template, so a code release
  makes every served version's revision name new, and the next `apply` builds them from the
  released code, one per step, moving each version's share onto its new revision.

`apply` never waits: it starts at most one UpdateService and returns its operation's name; a
later call with that name in `running` checks it through the operations API.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.longrunning import operations_pb2  # type: ignore[import-untyped]

from mlpipe.runtime import labels
from mlpipe.runtime.labels import label_value
from mlpipe.store.registry import ModelVersion, Traffic
from mlpipe_deployer.targets import (
    SERVE_MODEL_ENV,
    SERVE_VERSION_ENV,
    Rollout,
    version_labels,
)

PINS = (SERVE_MODEL_ENV, SERVE_VERSION_ENV)
MODEL_LABEL = "mlpipe-model"
VERSION_LABEL = "mlpipe-version"
RUN_LABEL = "run_id"
RELEASE_LABEL = "mlpipe-release"
# The billing export's (mlpipe.runtime.labels): the run the served version came from.
COST_LABELS = (labels.RUN_ID, labels.PIPELINE, labels.ENV)
ROLLOUT_LABELS = (MODEL_LABEL, VERSION_LABEL, RUN_LABEL, RELEASE_LABEL, "commit", *COST_LABELS)
REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
FAILED = run_v2.Condition.State.CONDITION_FAILED


class CloudRunRolloutError(RuntimeError):
    """A Cloud Run change the rollout depends on failed: retrying the same step cannot help."""


def code_release(template: run_v2.RevisionTemplate) -> run_v2.RevisionTemplate:
    """The template as the last code release left it: without the revision name, the rollout's
    labels and the variables that pin a model version."""
    base = run_v2.RevisionTemplate(template)
    base.revision = ""
    for key in ROLLOUT_LABELS:
        base.labels.pop(key, None)
    for container in base.containers:
        kept = [e for e in container.env if e.name not in PINS]
        del container.env[:]
        container.env.extend(kept)
    return base


def release_fingerprint(template: run_v2.RevisionTemplate) -> str:
    """Six hex digits that change whenever a code release changes the template."""
    canonical = run_v2.RevisionTemplate.to_json(code_release(template), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:6]


def revision_name(service: str, model: str, version: int, release: str) -> str:
    """A revision name Cloud Run accepts: '<service>-', then [a-z0-9-], at most 63 in all; one
    per (model version, code release), so a retried update never makes a second one."""
    tail = f"-v{version}-{release}"
    room = max(0, 63 - len(service) - 1 - len(tail))
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower())[:room].strip("-")
    return f"{service}-{slug}{tail}" if slug else f"{service}{tail}"


def pinned_template(
    current: run_v2.RevisionTemplate,
    name: str,
    model: str,
    mv: ModelVersion,
    release: str,
    env: str = "",
) -> run_v2.RevisionTemplate:
    """The released template, pinned to one model version; labelled with its run, pipeline
    and environment `env` for the billing export."""
    template = code_release(current)
    template.revision = name
    template.labels.update(
        {
            MODEL_LABEL: label_value(model),
            VERSION_LABEL: str(mv.version),
            RUN_LABEL: label_value(mv.run_id),
            RELEASE_LABEL: release,
        }
        | version_labels(mv, env)
    )
    if not template.containers:
        raise CloudRunRolloutError("the predictor service's template has no container")
    template.containers[0].env.extend(
        [
            run_v2.EnvVar(name=SERVE_MODEL_ENV, value=model),
            run_v2.EnvVar(name=SERVE_VERSION_ENV, value=str(mv.version)),
        ]
    )
    return template


def pinned_to(revision: run_v2.Revision) -> tuple[str, int] | None:
    """The (model, version) a revision serves, read from its environment: labels are copied
    from template to template by tools that edit the template (`gcloud run deploy` keeps
    them), the pins are not (`--set-env-vars` replaces every variable)."""
    env = {e.name: e.value for c in revision.containers[:1] for e in c.env}
    model, version = env.get(SERVE_MODEL_ENV), env.get(SERVE_VERSION_ENV, "")
    return (model, int(version)) if model and version.isdigit() else None


def _failed(revision: run_v2.Revision) -> str:
    for condition in revision.conditions:
        if condition.type_ == "Ready" and condition.state == FAILED:
            return condition.message.rstrip(".") or "not ready"
    return ""


def next_update(
    current: run_v2.Service,
    revisions: Sequence[run_v2.Revision],
    model: str,
    traffic: Traffic,
    versions: dict[int, ModelVersion],
    env: str = "",
) -> run_v2.UpdateServiceRequest | None:
    """The one update that brings the service a step closer to `traffic` served by revisions
    of the current code release, or None when it already serves it.

    At most one new revision per step (a template makes one revision): a version without a
    revision of this release keeps the share on the revision that served it, or, having none,
    its share goes to the revision this step creates."""
    service_name = current.name.rsplit("/", 1)[-1]
    release = release_fingerprint(current.template)
    existing = {r.name.rsplit("/", 1)[-1]: r for r in revisions}
    serving = {t.revision for t in current.traffic}
    shares = traffic.shares()
    if not shares:
        return None
    others = sorted(
        {
            pinned[0]
            for t in current.traffic
            if t.percent
            and t.revision in existing
            and (pinned := pinned_to(existing[t.revision])) is not None
            and pinned[0] != model
        }
    )
    if others:
        # A request reaches one revision, and a revision serves one model: moving this model
        # in would take every request from the other.
        raise CloudRunRolloutError(
            f"{service_name} serves model {', '.join(others)}; the cloud_run target serves one "
            f"model per predictor service: give {model}'s deployer its own service "
            "(MLPIPE_CLOUD_RUN_SERVICE)"
        )
    wanted = {v: revision_name(service_name, model, v, release) for v, _, _ in shares}
    for version, name in wanted.items():
        if name in existing and _failed(existing[name]):
            raise CloudRunRolloutError(
                f"revision {name} (model {model} v{version}) failed: "
                f"{_failed(existing[name])}; release a working predictor, then roll out again"
            )

    def older(version: int) -> str | None:
        """A ready revision of an earlier release that serves `version`, preferring one with
        traffic now."""
        found = [
            n for n, r in existing.items() if pinned_to(r) == (model, version) and not _failed(r)
        ]
        found.sort(key=lambda n: (n in serving, n))
        return found[-1] if found else None

    missing = [v for v, _, _ in shares if wanted[v] not in existing]
    # A version nothing serves yet goes first, then the others move to the new release.
    missing.sort(key=lambda v: older(v) is not None)
    create = missing[0] if missing else None
    targets: list[tuple[str, int, str]] = []
    orphaned = 0
    for version, percent, alias in shares:
        if wanted[version] in existing or version == create:
            targets.append((wanted[version], percent, alias))
            continue
        old = older(version)
        if old is None:
            orphaned += percent
        else:
            targets.append((old, percent, alias))
    if orphaned:
        targets = [
            (n, p + orphaned, a) if create is not None and n == wanted[create] else (n, p, a)
            for n, p, a in targets
        ]
    now = sorted((t.revision, t.percent, t.tag) for t in current.traffic if t.type_ == REVISION)
    if create is None and now == sorted(targets) and len(now) == len(current.traffic):
        return None
    service = run_v2.Service(current)
    if create is not None:
        service.template = pinned_template(
            current.template, wanted[create], model, versions[create], release, env
        )
    del service.traffic[:]
    service.traffic.extend(
        run_v2.TrafficTarget(type_=REVISION, revision=name, percent=percent, tag=alias)
        for name, percent, alias in targets
    )
    return run_v2.UpdateServiceRequest(service=service)


@dataclass
class CloudRunTarget:
    project: str
    region: str
    service: str
    # The image a code release deploys; a rollout keeps the service's own (see the module doc).
    image: str
    code_version: str
    name: str = "cloud_run"
    services: Any = None
    env: str = ""  # the environment (MLPIPE_ENV): a label of the revisions it makes
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
        still = []
        for name in running:
            if name == self.service_path:
                continue  # someone else's change: waited for through `reconciling` below
            op = services.get_operation(operations_pb2.GetOperationRequest(name=name))
            if not op.done:
                still.append(name)
            elif op.HasField("error"):
                raise CloudRunRolloutError(
                    f"Cloud Run operation {name} on {self.service_path} failed "
                    f"(code {op.error.code}): {op.error.message}"
                )
        if still:
            return Rollout(self.service_path, still)
        try:
            current = services.get_service(name=self.service_path)
        except gexc.NotFound:
            raise CloudRunRolloutError(
                f"Cloud Run service {self.service_path} does not exist: deploy the predictor "
                f"({self.image or 'its image'}) through cloudbuild/ first"
            ) from None
        if current.reconciling:
            # A change is under way (a redelivery of this step, or a code release): start
            # nothing until it is over.
            return Rollout(self.service_path, [self.service_path])
        listed = list(revisions.list_revisions(parent=self.service_path))
        request = next_update(current, listed, model, traffic, versions, self.env)
        if request is None:
            split = ", ".join(f"{t.revision} {t.percent}%" for t in current.traffic)
            return Rollout(f"{self.service_path} ({split})")
        operation = services.update_service(request=request)
        split = ", ".join(f"{t.revision} {t.percent}%" for t in request.service.traffic)
        return Rollout(f"{self.service_path} ({split})", [operation.operation.name])
