"""Vertex AI: the registry's versions uploaded as versions of one Vertex model, deployed to the
model's own endpoint with the registry's traffic split.

`apply` never waits on an operation: each call checks the operations of the previous one,
then starts the next step (an upload, a deployment, an undeployment) and returns its name; the
deployer records it and calls again (mlpipe_deployer.progress). Every step is read from what
Vertex serves, so a repeated call starts nothing twice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.cloud import aiplatform_v1
from google.longrunning import operations_pb2  # type: ignore[import-untyped]
from google.protobuf import field_mask_pb2

from mlpipe.runtime.labels import label_value
from mlpipe.runtime.vertex_api import vertex_client_kwargs
from mlpipe.store.registry import ModelVersion, Traffic
from mlpipe_deployer.targets import (
    SERVE_MODEL_ENV,
    SERVE_VERSION_ENV,
    Rollout,
    version_labels,
)

log = logging.getLogger(__name__)


def vertex_model_id(model: str) -> str:
    """A Vertex AI model id: up to 63 of [a-z0-9_-], not starting with a digit or '-'
    (UploadModelRequest.model_id); a name that starts with one gets an `m-` prefix."""
    slug = re.sub(r"[^a-z0-9_-]", "-", model.lower())
    if not slug or not (slug[0].isalpha() or slug[0] == "_"):
        slug = "m-" + slug
    return slug[:63]


def model_id_of(name: str) -> str:
    """The model id in a model resource name, whatever names its project (id or number) and
    with or without `@version`: `projects/123/locations/l/models/iris@2` → `iris`."""
    return name.rsplit("/models/", 1)[-1].split("@", 1)[0]


def upload_request(
    project: str,
    region: str,
    model: str,
    mv: ModelVersion,
    *,
    model_exists: bool,
    image: str,
    bucket: str,
    code_version: str,
    alias: str,
    env: str = "",
) -> aiplatform_v1.UploadModelRequest:
    """Upload registry version `mv` as a new version of the same Vertex AI model
    (`parent_model`), or as its first version; labels carry the lineage, and the run,
    pipeline and environment `env` for the billing export."""
    parent = f"projects/{project}/locations/{region}"
    artifact_dir = mv.model_uri.rsplit("/", 1)[0] + "/"
    body = aiplatform_v1.Model(
        display_name=model,
        description=f"mlpipe {model} v{mv.version} (run {mv.run_id})",
        version_description=f"registry version {mv.version}, run {mv.run_id}",
        version_aliases=[f"v{mv.version}", alias],
        labels={
            "run_id": label_value(mv.run_id),
            "commit": label_value(code_version),
            "mlpipe_version": str(mv.version),
        }
        | version_labels(mv, env),
        artifact_uri=artifact_dir,
        container_spec=aiplatform_v1.ModelContainerSpec(
            image_uri=image,
            env=[
                aiplatform_v1.EnvVar(name=SERVE_MODEL_ENV, value=model),
                aiplatform_v1.EnvVar(name=SERVE_VERSION_ENV, value=str(mv.version)),
                aiplatform_v1.EnvVar(name="MLPIPE_PROJECT", value=project),
                aiplatform_v1.EnvVar(name="MLPIPE_BUCKET", value=bucket),
                aiplatform_v1.EnvVar(name="MLPIPE_CODE_VERSION", value=code_version),
            ],
            # The predictor serves on AIP_HTTP_PORT, its health and predict routes are
            # AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE (Vertex's defaults), and it reads the
            # version from AIP_STORAGE_URI: no push route, so no push settings.
            ports=[aiplatform_v1.Port(container_port=8080)],
        ),
    )
    model_path = f"{parent}/models/{vertex_model_id(model)}"
    if model_exists:
        return aiplatform_v1.UploadModelRequest(parent=parent, parent_model=model_path, model=body)
    return aiplatform_v1.UploadModelRequest(
        parent=parent, model_id=vertex_model_id(model), model=body
    )


def uploaded_version(versions: Sequence[aiplatform_v1.Model], registry_version: int) -> str | None:
    """The Vertex version id already uploaded for a registry version (a retried step)."""
    for found in versions:
        if found.labels.get("mlpipe_version") == str(registry_version):
            return str(found.version_id)
    return None


def endpoint_step(
    endpoint: aiplatform_v1.Endpoint,
    model_path: str,
    model: str,
    desired: dict[str, tuple[int, int]],
    *,
    machine_type: str,
    min_replicas: int,
    max_replicas: int,
    service_account: str = "",
) -> list[Any]:
    """The next requests that bring `endpoint` towards serving `desired` (Vertex version id →
    (registry version, percent)); [] once it does.

    One long-running step at a time: deploy a missing version (its share as `"0"`, the
    deployed ones at theirs: deployModel's split replaces the endpoint's); else set the split
    (a plain update) and undeploy one version of this model that no longer gets traffic.
    Deployed models are this model's by model id and version id: Vertex names them with the
    project number, whatever the request used. An endpoint serving another model is refused
    (ValueError): a split mixes the models behind one predict API, so each model has its own.
    """
    model_id = model_id_of(model_path)
    others = sorted({model_id_of(d.model) for d in endpoint.deployed_models} - {model_id})
    if others:
        raise ValueError(
            f"endpoint {endpoint.name} serves other models ({', '.join(others)}); mlpipe gives "
            f"each model its own endpoint (MLPIPE_VERTEX_ENDPOINT for {model})"
        )
    deployed: dict[str, str] = {}
    extra: list[str] = []  # a version deployed twice, or one no longer wanted
    for d in endpoint.deployed_models:
        if d.model_version_id in desired and d.model_version_id not in deployed:
            deployed[d.model_version_id] = d.id
        else:
            extra.append(d.id)
    missing = [vid for vid in desired if vid not in deployed]
    kept = {deployed[vid]: percent for vid, (_, percent) in desired.items() if vid in deployed}
    if missing:
        vid = missing[0]
        registry_version = desired[vid][0]
        # The versions still to deploy after this one get their share later.
        split = {"0": 100 - sum(kept.values()), **kept, **dict.fromkeys(extra, 0)}
        return [
            aiplatform_v1.DeployModelRequest(
                endpoint=endpoint.name,
                deployed_model=aiplatform_v1.DeployedModel(
                    model=f"{model_path}@{vid}",
                    display_name=f"{model}-v{registry_version}",
                    service_account=service_account,
                    dedicated_resources=aiplatform_v1.DedicatedResources(
                        machine_spec=aiplatform_v1.MachineSpec(machine_type=machine_type),
                        min_replica_count=min_replicas,
                        max_replica_count=max_replicas,
                    ),
                ),
                traffic_split=split,
            )
        ]
    requests: list[Any] = []
    current = {k: v for k, v in endpoint.traffic_split.items() if v}
    if current != {k: v for k, v in kept.items() if v}:
        requests.append(
            aiplatform_v1.UpdateEndpointRequest(
                endpoint=aiplatform_v1.Endpoint(
                    name=endpoint.name, traffic_split={**kept, **dict.fromkeys(extra, 0)}
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
            )
        )
    if extra:
        requests.append(
            aiplatform_v1.UndeployModelRequest(endpoint=endpoint.name, deployed_model_id=extra[0])
        )
    return requests


def alias_requests(
    model_path: str, desired: dict[str, tuple[int, int]], traffic: Traffic
) -> list[aiplatform_v1.MergeVersionAliasesRequest]:
    """Move the `champion` and `canary` version aliases to match the registry (assigning an
    alias that another version holds moves it; a '-' prefix removes one)."""
    by_version = {registry_version: vid for vid, (registry_version, _) in desired.items()}
    requests = []
    if traffic.champion is not None and traffic.champion in by_version:
        aliases = ["champion"] if traffic.canary is not None else ["champion", "-canary"]
        requests.append(
            aiplatform_v1.MergeVersionAliasesRequest(
                name=f"{model_path}@{by_version[traffic.champion]}", version_aliases=aliases
            )
        )
    if traffic.canary is not None and traffic.canary in by_version:
        requests.append(
            aiplatform_v1.MergeVersionAliasesRequest(
                name=f"{model_path}@{by_version[traffic.canary]}", version_aliases=["canary"]
            )
        )
    return requests


@dataclass
class VertexTarget:
    project: str
    region: str
    endpoint: str  # id or resource name
    image: str
    bucket: str
    code_version: str
    machine_type: str = "n1-standard-2"
    min_replicas: int = 1
    max_replicas: int = 1
    # The identity the predictor runs as (DeployedModel.service_account); empty: Vertex's
    # default serving identity, which may read only AIP_STORAGE_URI.
    service_account: str = ""
    api_endpoint: str = ""  # default: the regional host
    api_transport: str = ""  # default: grpc, or rest for an http:// endpoint
    name: str = "vertex"
    models: Any = None
    endpoints: Any = None
    env: str = ""  # the environment (MLPIPE_ENV): a label of what it uploads and deploys

    @property
    def endpoint_path(self) -> str:
        if self.endpoint.startswith("projects/"):
            return self.endpoint
        return f"projects/{self.project}/locations/{self.region}/endpoints/{self.endpoint}"

    def _clients(self) -> tuple[Any, Any]:
        if self.models is None or self.endpoints is None:
            kwargs = vertex_client_kwargs(self.region, self.api_endpoint, self.api_transport)
            self.models = self.models or aiplatform_v1.ModelServiceClient(**kwargs)
            self.endpoints = self.endpoints or aiplatform_v1.EndpointServiceClient(**kwargs)
        return self.models, self.endpoints

    def _still_running(self, running: Sequence[str]) -> tuple[list[str], str]:
        """(operations of `running` not done yet, the error of one that failed or "")."""
        from google.api_core import exceptions as gexc

        models, endpoints = self._clients()
        left = []
        for name in running:
            client = models if "/models/" in name else endpoints
            try:
                op = client.get_operation(operations_pb2.GetOperationRequest(name=name))
            except gexc.NotFound:
                # Vertex no longer knows it: the next step is read from what Vertex serves.
                log.warning("operation %s is gone; reading the endpoint again", name)
                continue
            if not op.done:
                left.append(name)
            elif op.HasField("error") and op.error.code:
                return [], f"Vertex AI operation {name} failed: {op.error.message}"
        return left, ""

    def apply(
        self,
        model: str,
        traffic: Traffic,
        versions: dict[int, ModelVersion],
        running: Sequence[str] = (),
    ) -> Rollout:
        """One step: wait for nothing; start at most one long-running operation."""
        from google.api_core import exceptions as gexc

        models, endpoints = self._clients()
        left, failed = self._still_running(running)
        if failed:
            return Rollout(self.endpoint_path, error=failed)
        if left:
            return Rollout(self.endpoint_path, left)
        model_path = (
            f"projects/{self.project}/locations/{self.region}/models/{vertex_model_id(model)}"
        )
        try:
            uploaded = list(models.list_model_versions(name=model_path))
        except gexc.NotFound:
            uploaded = []
        desired: dict[str, tuple[int, int]] = {}
        for version, percent, alias in traffic.shares():
            vid = uploaded_version(uploaded, version)
            if vid is None:
                request = upload_request(
                    self.project,
                    self.region,
                    model,
                    versions[version],
                    model_exists=bool(uploaded),
                    image=self.image,
                    bucket=self.bucket,
                    code_version=self.code_version,
                    alias=alias,
                    env=self.env,
                )
                started = models.upload_model(request=request)
                return Rollout(self.endpoint_path, [started.operation.name])
            desired[vid] = (version, percent)
        endpoint = endpoints.get_endpoint(name=self.endpoint_path)
        try:
            requests = endpoint_step(
                endpoint,
                model_path,
                model,
                desired,
                machine_type=self.machine_type,
                min_replicas=self.min_replicas,
                max_replicas=self.max_replicas,
                service_account=self.service_account,
            )
        except ValueError as exc:
            return Rollout(self.endpoint_path, error=str(exc))
        operations = []
        for request in requests:
            if isinstance(request, aiplatform_v1.DeployModelRequest):
                operations.append(endpoints.deploy_model(request=request).operation.name)
            elif isinstance(request, aiplatform_v1.UndeployModelRequest):
                operations.append(endpoints.undeploy_model(request=request).operation.name)
            else:
                endpoints.update_endpoint(request=request)
        if operations:
            return Rollout(self.endpoint_path, operations)
        for merge in alias_requests(model_path, desired, traffic):
            models.merge_version_aliases(request=merge)
        split = ", ".join(f"v{v}@{vid} {p}%" for vid, (v, p) in desired.items())
        # The endpoint's name as Vertex returns it (with the project number).
        return Rollout(f"{endpoint.name or self.endpoint_path} ({split})")
