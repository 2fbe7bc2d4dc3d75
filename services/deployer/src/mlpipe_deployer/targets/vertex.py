"""Vertex AI: the registry's versions uploaded as versions of one Vertex model, deployed to an
endpoint with the registry's traffic split."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.cloud import aiplatform_v1
from google.protobuf import field_mask_pb2

from mlpipe.store.registry import ModelVersion, Traffic
from mlpipe_deployer.targets import SERVE_MODEL_ENV, SERVE_VERSION_ENV, Rollout, label_value

log = logging.getLogger(__name__)


def vertex_model_id(model: str) -> str:
    """A Vertex AI model id: [a-z0-9_-], not starting with '-' or '_', ≤ 63."""
    return re.sub(r"[^a-z0-9_-]", "-", model.lower()).lstrip("-_")[:63]


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
) -> aiplatform_v1.UploadModelRequest:
    """Upload registry version `mv` as a new version of the same Vertex AI model
    (`parent_model`), or as its first version; labels carry the lineage."""
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
        },
        artifact_uri=artifact_dir,
        container_spec=aiplatform_v1.ModelContainerSpec(
            image_uri=image,
            env=[
                aiplatform_v1.EnvVar(name=SERVE_MODEL_ENV, value=model),
                aiplatform_v1.EnvVar(name=SERVE_VERSION_ENV, value=str(mv.version)),
                aiplatform_v1.EnvVar(name="MLPIPE_PROJECT", value=project),
                aiplatform_v1.EnvVar(name="MLPIPE_BUCKET", value=bucket),
            ],
            ports=[aiplatform_v1.Port(container_port=8080)],
            predict_route=f"/v1/models/{model}:predict",
            health_route="/readyz",
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


def endpoint_requests(
    endpoint: aiplatform_v1.Endpoint,
    model_path: str,
    model: str,
    desired: dict[str, tuple[int, int]],
    *,
    machine_type: str,
    min_replicas: int,
    max_replicas: int,
) -> list[Any]:
    """Requests that make `endpoint` serve `desired` (Vertex version id → (registry version,
    percent)): deploy what is missing with the whole split, else update the split; then
    undeploy this model's versions that no longer get traffic."""
    deployed = {d.model_version_id: d.id for d in endpoint.deployed_models if d.model == model_path}
    missing = [vid for vid in desired if vid not in deployed]
    if len(missing) > 1:
        raise ValueError(f"one new deployment per rollout step, not {missing}")
    split = {deployed[vid]: percent for vid, (_, percent) in desired.items() if vid in deployed}
    requests: list[Any] = []
    if missing:
        vid = missing[0]
        registry_version, percent = desired[vid]
        requests.append(
            aiplatform_v1.DeployModelRequest(
                endpoint=endpoint.name,
                deployed_model=aiplatform_v1.DeployedModel(
                    model=f"{model_path}@{vid}",
                    display_name=f"{model}-v{registry_version}",
                    dedicated_resources=aiplatform_v1.DedicatedResources(
                        machine_spec=aiplatform_v1.MachineSpec(machine_type=machine_type),
                        min_replica_count=min_replicas,
                        max_replica_count=max_replicas,
                    ),
                ),
                # "0" is the model being deployed; the split replaces the endpoint's.
                traffic_split={"0": percent, **split},
            )
        )
    else:
        requests.append(
            aiplatform_v1.UpdateEndpointRequest(
                endpoint=aiplatform_v1.Endpoint(name=endpoint.name, traffic_split=split),
                update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
            )
        )
    for vid, deployed_id in deployed.items():
        if vid not in desired:
            requests.append(
                aiplatform_v1.UndeployModelRequest(
                    endpoint=endpoint.name, deployed_model_id=deployed_id
                )
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
    name: str = "vertex"
    models: Any = None
    endpoints: Any = None

    @property
    def endpoint_path(self) -> str:
        if self.endpoint.startswith("projects/"):
            return self.endpoint
        return f"projects/{self.project}/locations/{self.region}/endpoints/{self.endpoint}"

    def _clients(self) -> tuple[Any, Any]:
        options = {"api_endpoint": f"{self.region}-aiplatform.googleapis.com"}
        models = self.models or aiplatform_v1.ModelServiceClient(client_options=options)
        endpoints = self.endpoints or aiplatform_v1.EndpointServiceClient(client_options=options)
        return models, endpoints

    def apply(
        self,
        model: str,
        traffic: Traffic,
        versions: dict[int, ModelVersion],
        running: Sequence[str] = (),
    ) -> Rollout:
        from google.api_core import exceptions as gexc

        models, endpoints = self._clients()
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
                )
                vid = str(models.upload_model(request=request).result(timeout=540).model_version_id)
                uploaded = list(models.list_model_versions(name=model_path))
            desired[vid] = (version, percent)
        endpoint = endpoints.get_endpoint(name=self.endpoint_path)
        for request in endpoint_requests(
            endpoint,
            model_path,
            model,
            desired,
            machine_type=self.machine_type,
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
        ):
            if isinstance(request, aiplatform_v1.DeployModelRequest):
                endpoints.deploy_model(request=request).result(timeout=1800)
            elif isinstance(request, aiplatform_v1.UndeployModelRequest):
                endpoints.undeploy_model(request=request).result(timeout=900)
            else:
                endpoints.update_endpoint(request=request)
        for request in alias_requests(model_path, desired, traffic):
            models.merge_version_aliases(request=request)
        split = ", ".join(f"v{v}@{vid} {p}%" for vid, (v, p) in desired.items())
        return Rollout(f"{self.endpoint_path} ({split})")
