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
    endpoint_step,
    upload_request,
    vertex_model_id,
)

IMAGE = "us-central1-docker.pkg.dev/acme-ml-dev/mlpipe/predictor:abc123"
MODEL_PATH = "projects/acme-ml-dev/locations/us-central1/models/iris-classifier"
ENDPOINT = "projects/acme-ml-dev/locations/us-central1/endpoints/1234"
# What Vertex returns: canonical names carry the project number, whatever the request used.
NUMBERED_MODEL = "projects/123456789012/locations/us-central1/models/iris-classifier"
NUMBERED_ENDPOINT = "projects/123456789012/locations/us-central1/endpoints/1234"


def version(n: int) -> ModelVersion:
    return ModelVersion(
        "iris-classifier",
        n,
        f"run{n:013d}",
        f"gs://acme/registry/iris-classifier/versions/{n}/model.joblib",
        "sha",
        {},
    )


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
        env="dev",
    )

    assert first.parent == "projects/acme-ml-dev/locations/us-central1"
    assert first.model_id == "iris-classifier" and not first.parent_model
    assert second.parent_model == MODEL_PATH and not second.model_id
    assert second.model == aiplatform_v1.Model(
        display_name="iris-classifier",
        description="mlpipe iris-classifier v2 (run run0000000000002)",
        version_description="registry version 2, run run0000000000002",
        version_aliases=["v2", "canary"],
        labels={
            "run_id": "run0000000000002",
            "commit": "abc123",
            "mlpipe_version": "2",
            # The billing export's: the run, its pipeline (the model's name for a version
            # registered without one) and the environment.
            "mlpipe-run-id": "run0000000000002",
            "mlpipe-pipeline": "iris-classifier",
            "mlpipe-env": "dev",
        },
        artifact_uri="gs://acme/registry/iris-classifier/versions/2/",
        container_spec=aiplatform_v1.ModelContainerSpec(
            image_uri=IMAGE,
            env=[
                aiplatform_v1.EnvVar(name="MLPIPE_SERVE_MODEL", value="iris-classifier"),
                aiplatform_v1.EnvVar(name="MLPIPE_SERVE_VERSION", value="2"),
                aiplatform_v1.EnvVar(name="MLPIPE_PROJECT", value="acme-ml-dev"),
                aiplatform_v1.EnvVar(name="MLPIPE_BUCKET", value="acme-mlpipe"),
                aiplatform_v1.EnvVar(name="MLPIPE_CODE_VERSION", value="abc123"),
            ],
            # Vertex's own routes (AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE): the predictor
            # honours them, and needs no push settings.
            ports=[aiplatform_v1.Port(container_port=8080)],
        ),
    )
    assert first.model.labels["commit"] == "abc123-dirty"


def endpoint_with(*deployed: tuple[str, str], split: dict[str, int] | None = None) -> Any:
    """An endpoint as Vertex returns it: names with the project number."""
    return aiplatform_v1.Endpoint(
        name=NUMBERED_ENDPOINT,
        deployed_models=[
            aiplatform_v1.DeployedModel(id=dm_id, model=NUMBERED_MODEL, model_version_id=vid)
            for dm_id, vid in deployed
        ],
        traffic_split=split
        if split is not None
        else {d: 100 // len(deployed) for d, _ in deployed},
    )


def step(endpoint: Any, desired: dict[str, tuple[int, int]]) -> list[Any]:
    return endpoint_step(
        endpoint,
        MODEL_PATH,
        "iris-classifier",
        desired,
        machine_type="n1-standard-2",
        min_replicas=1,
        max_replicas=3,
        service_account="mlpipe-serving@acme-ml-dev.iam.gserviceaccount.com",
    )


def test_a_canary_deploys_the_new_version_beside_the_one_vertex_names_by_project_number() -> None:
    requests = step(endpoint_with(("111", "1")), {"1": (1, 90), "2": (2, 10)})

    assert requests == [
        aiplatform_v1.DeployModelRequest(
            endpoint=NUMBERED_ENDPOINT,
            deployed_model=aiplatform_v1.DeployedModel(
                model=f"{MODEL_PATH}@2",
                display_name="iris-classifier-v2",
                service_account="mlpipe-serving@acme-ml-dev.iam.gserviceaccount.com",
                dedicated_resources=aiplatform_v1.DedicatedResources(
                    machine_spec=aiplatform_v1.MachineSpec(machine_type="n1-standard-2"),
                    min_replica_count=1,
                    max_replica_count=3,
                ),
            ),
            traffic_split={"0": 10, "111": 90},
        )
    ]


def test_a_promotion_moves_the_split_then_undeploys_the_old_champion_one_step_at_a_time() -> None:
    during = endpoint_with(("111", "1"), ("222", "2"), split={"111": 90, "222": 10})
    moved = endpoint_with(("111", "1"), ("222", "2"), split={"222": 100})
    after = endpoint_with(("222", "2"), split={"222": 100})

    assert step(during, {"2": (2, 100)}) == [
        aiplatform_v1.UpdateEndpointRequest(
            endpoint=aiplatform_v1.Endpoint(
                name=NUMBERED_ENDPOINT, traffic_split={"222": 100, "111": 0}
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
        ),
        aiplatform_v1.UndeployModelRequest(endpoint=NUMBERED_ENDPOINT, deployed_model_id="111"),
    ]
    assert step(moved, {"2": (2, 100)}) == [
        aiplatform_v1.UndeployModelRequest(endpoint=NUMBERED_ENDPOINT, deployed_model_id="111")
    ]
    assert step(after, {"2": (2, 100)}) == []


def test_a_rollback_to_an_undeployed_version_deploys_it_with_all_the_traffic() -> None:
    requests = step(endpoint_with(("222", "2")), {"1": (1, 100)})

    assert [type(r).__name__ for r in requests] == ["DeployModelRequest"]
    assert requests[0].traffic_split == {"0": 100, "222": 0}


def test_an_endpoint_that_serves_another_model_is_refused() -> None:
    shared = aiplatform_v1.Endpoint(
        name=NUMBERED_ENDPOINT,
        deployed_models=[
            aiplatform_v1.DeployedModel(
                id="333",
                model="projects/123456789012/locations/us-central1/models/bike-share",
                model_version_id="4",
            )
        ],
        traffic_split={"333": 100},
    )

    with pytest.raises(ValueError, match="serves other models \\(bike-share\\)"):
        step(shared, {"1": (1, 100)})


def test_vertex_model_ids_never_start_with_a_digit_or_hyphen() -> None:
    ids = [vertex_model_id(name) for name in ("2024-sales", "-x", "Iris.Classifier", "_a")]

    assert ids == ["m-2024-sales", "m--x", "iris-classifier", "_a"]
    assert all(re.fullmatch(r"[a-z_][a-z0-9_-]{0,62}", i) for i in ids)
    assert len(vertex_model_id("9" * 80)) == 63


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
    env.setenv("MLPIPE_VERTEX_SERVING_ACCOUNT", "serving@acme-ml-dev.iam.gserviceaccount.com")
    env.setenv("MLPIPE_VERTEX_API_ENDPOINT", "http://127.0.0.1:8095")
    target = make_target(load_settings(DeployerSettings))
    assert isinstance(target, VertexTarget) and target.endpoint_path == ENDPOINT
    assert target.service_account == "serving@acme-ml-dev.iam.gserviceaccount.com"
    assert target.api_endpoint == "http://127.0.0.1:8095"


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"MLPIPE_DEPLOY_TARGET": "kubernetes"},
            "MLPIPE_DEPLOY_TARGET: Value error, must be one of local, cloud_run (or cloudrun)",
        ),
        (
            {"MLPIPE_DEPLOY_TARGET": "vertex"},
            "needs MLPIPE_PREDICTOR_IMAGE, MLPIPE_VERTEX_ENDPOINT, MLPIPE_VERTEX_SERVING_ACCOUNT",
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
