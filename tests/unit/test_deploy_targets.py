"""The Vertex AI target at its client boundary: the exact requests built with the real client
libraries' types, and the settings that choose a target (the Cloud Run target:
test_deploy_cloud_run.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from google.cloud import aiplatform_v1
from google.protobuf import field_mask_pb2

from mlpipe.runtime.settings import SettingsError, load_settings
from mlpipe.store.registry import ModelVersion, Traffic
from mlpipe_deployer.settings import DeployerSettings
from mlpipe_deployer.targets import LocalTarget
from mlpipe_deployer.targets.cloud_run import CloudRunTarget
from mlpipe_deployer.targets.configured import make_target
from mlpipe_deployer.targets.vertex import (
    VertexTarget,
    alias_requests,
    endpoint_requests,
    upload_request,
    uploaded_version,
)

IMAGE = "us-central1-docker.pkg.dev/acme-ml-dev/mlpipe/predictor:abc123"
MODEL_PATH = "projects/acme-ml-dev/locations/us-central1/models/iris-classifier"
ENDPOINT = "projects/acme-ml-dev/locations/us-central1/endpoints/1234"


def version(n: int) -> ModelVersion:
    return ModelVersion(
        "iris-classifier",
        n,
        f"run{n:013d}",
        f"gs://acme/registry/iris-classifier/versions/{n}/model.joblib",
        "sha",
        {},
    )


class FakeOperation:
    def __init__(self, value: Any = None) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> Any:
        return self.value


# --- Vertex AI --------------------------------------------------------------------------------
def test_the_first_upload_creates_the_model_and_later_ones_are_versions_of_it() -> None:
    first = upload_request(
        "acme-ml-dev",
        "us-central1",
        "iris-classifier",
        version(1),
        model_exists=False,
        image=IMAGE,
        bucket="acme-mlpipe",
        code_version="abc123-dirty",
        alias="champion",
    )
    second = upload_request(
        "acme-ml-dev",
        "us-central1",
        "iris-classifier",
        version(2),
        model_exists=True,
        image=IMAGE,
        bucket="acme-mlpipe",
        code_version="abc123",
        alias="canary",
    )

    assert first.parent == "projects/acme-ml-dev/locations/us-central1"
    assert first.model_id == "iris-classifier" and not first.parent_model
    assert second.parent_model == MODEL_PATH and not second.model_id
    assert second.model == aiplatform_v1.Model(
        display_name="iris-classifier",
        description="mlpipe iris-classifier v2 (run run0000000000002)",
        version_description="registry version 2, run run0000000000002",
        version_aliases=["v2", "canary"],
        labels={"run_id": "run0000000000002", "commit": "abc123", "mlpipe_version": "2"},
        artifact_uri="gs://acme/registry/iris-classifier/versions/2/",
        container_spec=aiplatform_v1.ModelContainerSpec(
            image_uri=IMAGE,
            env=[
                aiplatform_v1.EnvVar(name="MLPIPE_SERVE_MODEL", value="iris-classifier"),
                aiplatform_v1.EnvVar(name="MLPIPE_SERVE_VERSION", value="2"),
                aiplatform_v1.EnvVar(name="MLPIPE_PROJECT", value="acme-ml-dev"),
                aiplatform_v1.EnvVar(name="MLPIPE_BUCKET", value="acme-mlpipe"),
            ],
            ports=[aiplatform_v1.Port(container_port=8080)],
            predict_route="/v1/models/iris-classifier:predict",
            health_route="/readyz",
        ),
    )
    assert first.model.labels["commit"] == "abc123-dirty"


def endpoint_with(*deployed: tuple[str, str]) -> aiplatform_v1.Endpoint:
    return aiplatform_v1.Endpoint(
        name=ENDPOINT,
        deployed_models=[
            aiplatform_v1.DeployedModel(id=dm_id, model=MODEL_PATH, model_version_id=vid)
            for dm_id, vid in deployed
        ],
    )


def test_a_canary_deploys_the_new_version_with_the_whole_split() -> None:
    requests = endpoint_requests(
        endpoint_with(("111", "1")),
        MODEL_PATH,
        "iris-classifier",
        {"1": (1, 90), "2": (2, 10)},
        machine_type="n1-standard-2",
        min_replicas=1,
        max_replicas=3,
    )

    assert requests == [
        aiplatform_v1.DeployModelRequest(
            endpoint=ENDPOINT,
            deployed_model=aiplatform_v1.DeployedModel(
                model=f"{MODEL_PATH}@2",
                display_name="iris-classifier-v2",
                dedicated_resources=aiplatform_v1.DedicatedResources(
                    machine_spec=aiplatform_v1.MachineSpec(machine_type="n1-standard-2"),
                    min_replica_count=1,
                    max_replica_count=3,
                ),
            ),
            traffic_split={"0": 10, "111": 90},
        )
    ]


def test_a_promotion_moves_the_split_then_undeploys_the_old_champion() -> None:
    requests = endpoint_requests(
        endpoint_with(("111", "1"), ("222", "2")),
        MODEL_PATH,
        "iris-classifier",
        {"2": (2, 100)},
        machine_type="n1-standard-2",
        min_replicas=1,
        max_replicas=1,
    )

    assert requests == [
        aiplatform_v1.UpdateEndpointRequest(
            endpoint=aiplatform_v1.Endpoint(name=ENDPOINT, traffic_split={"222": 100}),
            update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
        ),
        aiplatform_v1.UndeployModelRequest(endpoint=ENDPOINT, deployed_model_id="111"),
    ]


def test_aliases_follow_the_registry() -> None:
    during = alias_requests(MODEL_PATH, {"1": (1, 90), "2": (2, 10)}, Traffic(1, 2, 10))
    after = alias_requests(MODEL_PATH, {"2": (2, 100)}, Traffic(2))

    assert during == [
        aiplatform_v1.MergeVersionAliasesRequest(
            name=f"{MODEL_PATH}@1", version_aliases=["champion"]
        ),
        aiplatform_v1.MergeVersionAliasesRequest(
            name=f"{MODEL_PATH}@2", version_aliases=["canary"]
        ),
    ]
    assert after == [
        aiplatform_v1.MergeVersionAliasesRequest(
            name=f"{MODEL_PATH}@2", version_aliases=["champion", "-canary"]
        )
    ]


class RecordingVertex:
    def __init__(self, uploaded: list[aiplatform_v1.Model]) -> None:
        self.uploaded = uploaded
        self.sent: list[Any] = []

    def list_model_versions(self, name: str) -> list[aiplatform_v1.Model]:
        assert name == MODEL_PATH
        return list(self.uploaded)

    def upload_model(self, request: aiplatform_v1.UploadModelRequest) -> FakeOperation:
        self.sent.append(request)
        vid = str(len(self.uploaded) + 1)
        self.uploaded.append(aiplatform_v1.Model(version_id=vid, labels=dict(request.model.labels)))
        return FakeOperation(aiplatform_v1.UploadModelResponse(model_version_id=vid))

    def get_endpoint(self, name: str) -> aiplatform_v1.Endpoint:
        return endpoint_with(("111", "1"))

    def deploy_model(self, request: aiplatform_v1.DeployModelRequest) -> FakeOperation:
        self.sent.append(request)
        return FakeOperation()

    def merge_version_aliases(self, request: aiplatform_v1.MergeVersionAliasesRequest) -> None:
        self.sent.append(request)


def test_the_vertex_adapter_uploads_once_deploys_and_moves_aliases() -> None:
    existing = [aiplatform_v1.Model(version_id="1", labels={"mlpipe_version": "1"})]
    vertex = RecordingVertex(existing)
    target = VertexTarget(
        "acme-ml-dev",
        "us-central1",
        "1234",
        IMAGE,
        "acme-mlpipe",
        "abc123",
        models=vertex,
        endpoints=vertex,
    )

    resource = target.apply(
        "iris-classifier", Traffic(1, 2, 10), {1: version(1), 2: version(2)}
    ).resource

    kinds = [type(r).__name__ for r in vertex.sent]
    assert kinds == [
        "UploadModelRequest",
        "DeployModelRequest",
        "MergeVersionAliasesRequest",
        "MergeVersionAliasesRequest",
    ]
    assert vertex.sent[0].parent_model == MODEL_PATH
    assert vertex.sent[1].traffic_split == {"0": 10, "111": 90}
    assert uploaded_version(vertex.uploaded, 2) == "2"
    assert resource == f"{ENDPOINT} (v1@1 90%, v2@2 10%)"


# --- settings -----------------------------------------------------------------------------------
@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("MLPIPE_PROJECT", "acme-ml-dev")
    monkeypatch.setenv("MLPIPE_BUCKET", "acme-mlpipe")
    return monkeypatch


def test_the_target_is_chosen_by_the_environment(env: pytest.MonkeyPatch) -> None:
    assert isinstance(make_target(load_settings(DeployerSettings)), LocalTarget)
    env.setenv("MLPIPE_DEPLOY_TARGET", "cloudrun")
    env.setenv("MLPIPE_PREDICTOR_IMAGE", IMAGE)
    env.setenv("MLPIPE_CANARY_PERCENT", "10")
    settings = load_settings(DeployerSettings)
    assert settings.deploy_target == "cloud_run" and settings.canary_percent == 10
    assert isinstance(make_target(settings), CloudRunTarget)
    env.setenv("MLPIPE_DEPLOY_TARGET", "vertex")
    env.setenv("MLPIPE_VERTEX_ENDPOINT", "1234")
    target = make_target(load_settings(DeployerSettings))
    assert isinstance(target, VertexTarget) and target.endpoint_path == ENDPOINT


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"MLPIPE_DEPLOY_TARGET": "kubernetes"},
            "MLPIPE_DEPLOY_TARGET: Value error, must be one of local, cloud_run (or cloudrun)",
        ),
        (
            {"MLPIPE_DEPLOY_TARGET": "vertex"},
            "needs MLPIPE_PREDICTOR_IMAGE, MLPIPE_VERTEX_ENDPOINT",
        ),
        ({"MLPIPE_CANARY_PERCENT": "100"}, "MLPIPE_CANARY_PERCENT"),
    ],
)
def test_a_wrong_target_setting_stops_start_up_naming_it(
    env: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for key, value in variables.items():
        env.setenv(key, value)

    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(DeployerSettings)
