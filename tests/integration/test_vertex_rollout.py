"""The deployer's vertex target, end to end against the local Vertex AI: the real
google-cloud-aiplatform clients (REST, MLPIPE_VERTEX_API_ENDPOINT-style endpoint), the deployer's
real step and rollout routes, and the predictor's real image running under Vertex AI's
custom-container contract (the stand-in's deployModel starts it; docs/vertex-standin.md).

A rollout never waits inside a push: the step starts an operation, records it, and is
acknowledged; `POST /v1/rollouts:check` (here `progress.check_all`) finishes it. Needs a Docker
engine (`make test-cloud`): skipped without one, failed under CI=true.
"""

from __future__ import annotations

import collections
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform
from google.cloud import aiplatform_v1 as v1

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope, parse_envelope
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.runtime.steps import StepResult
from mlpipe.runtime.vertex_api import vertex_client_kwargs
from mlpipe.store import layout
from mlpipe.store.registry import Registry
from mlpipe.v1 import events_pb2
from mlpipe_deployer import progress, rollout
from mlpipe_deployer.deployment import Deployer
from mlpipe_deployer.targets.vertex import VertexTarget
from mlpipe_ops import containers as docker
from mlpipe_ops.standins.vertex import VertexStandIn
from tests.conftest import REPO, engine_missing
from tests.integration.conftest import Cloud, forward, job_started, notification, upload
from tests.integration.test_serving import RENAMED, SETOSA, renamed_iris, trained

pytestmark = pytest.mark.cloud

PROJECT_NUMBER = "987654321098"
LOCATION = "us-central1"
MODEL = "iris-classifier"
SERVING_ACCOUNT = "mlpipe-serving@proj.iam.gserviceaccount.com"
TRAINER_ACCOUNT = "mlpipe-trainer@proj.iam.gserviceaccount.com"
# A predictor container imports scikit-learn and onnxruntime and loads its version: generous,
# the machine is shared.
ROLLOUT_SECONDS = 300.0


@pytest.fixture(scope="module")
def predictor_image() -> str:
    missing = engine_missing()
    if missing:
        pytest.skip(missing)
    image, _ = docker.build("predictor", REPO, "test")
    return image


@pytest.fixture(scope="module")
def trainer_image() -> str:
    missing = engine_missing()
    if missing:
        pytest.skip(missing)
    image, _ = docker.build("trainer", REPO, "test")
    return image


@dataclass
class Vertex:
    standin: VertexStandIn
    endpoint: str  # its resource name, as Vertex returns it (project number)
    deployer: Deployer

    @property
    def endpoints(self) -> v1.EndpointServiceClient:
        return v1.EndpointServiceClient(**vertex_client_kwargs(LOCATION, self.standin.url))

    def deployed(self) -> dict[str, str]:
        """Deployed model id → Vertex model version id."""
        found = self.endpoints.get_endpoint(name=self.endpoint)
        return {d.id: d.model_version_id for d in found.deployed_models}

    def accounts(self) -> set[str]:
        found = self.endpoints.get_endpoint(name=self.endpoint)
        return {d.service_account for d in found.deployed_models}

    def split(self) -> dict[str, int]:
        """Model version id → percent."""
        found = self.endpoints.get_endpoint(name=self.endpoint)
        by_id = {d.id: d.model_version_id for d in found.deployed_models}
        return {by_id[k]: v for k, v in found.traffic_split.items() if v}

    def push(self, evaluation: events_pb2.EvaluationCompleted) -> StepResult:
        return self.deployer(parse_envelope(make_envelope(events.encode(evaluation))))

    def finish(self) -> None:
        """Check the running rollouts until none is left (what Cloud Scheduler does)."""
        deadline = time.monotonic() + ROLLOUT_SECONDS
        while self.deployer.storage.list(layout.ROLLOUTS):
            checked = progress.check_all(self.deployer)
            assert not any(c["error"] for c in checked), checked
            assert time.monotonic() < deadline, f"rollouts still running: {checked}"
            time.sleep(0.5)


@pytest.fixture
def standin(cloud: Cloud, tmp_path: Path) -> Iterator[VertexStandIn]:
    """The local Vertex AI for this test's project, reaching the emulators."""
    running = VertexStandIn(
        cloud.project,
        project_number=PROJECT_NUMBER,
        storage_emulator_host=os.environ["STORAGE_EMULATOR_HOST"],
        pubsub_emulator_host=os.environ["PUBSUB_EMULATOR_HOST"],
        operation_seconds=0.3,
        log_dir=tmp_path / "vertex-logs",
        seed=17,
        local_env={"MLPIPE_HOST": "127.0.0.1"},
    ).start()
    try:
        yield running
    finally:
        running.stop()


def new_endpoint(standin: VertexStandIn) -> str:
    """A new endpoint's resource name, as Vertex returns it (project number)."""
    endpoints = v1.EndpointServiceClient(**vertex_client_kwargs(LOCATION, standin.url))
    created = endpoints.create_endpoint(
        parent=f"projects/{standin.project_id}/locations/{LOCATION}",
        endpoint=v1.Endpoint(display_name=MODEL),
        endpoint_id=f"iris-{uuid.uuid4().hex[:8]}",
    ).result(timeout=60)
    return str(created.name)


@pytest.fixture
def vertex(cloud: Cloud, predictor_image: str, standin: VertexStandIn) -> Vertex:
    endpoint = new_endpoint(standin)
    target = VertexTarget(
        cloud.project,
        LOCATION,
        endpoint.rsplit("/", 1)[1],
        predictor_image,
        cloud.storage.bucket_name,
        "test",
        service_account=SERVING_ACCOUNT,
        api_endpoint=standin.url,
    )
    deployer = Deployer(
        cloud.storage,
        cloud.publisher,
        Registry(cloud.storage),
        "test",
        target=target,
        canary_percent=10,
    )
    return Vertex(standin, endpoint, deployer)


def predict(vertex: Vertex, instances: list[list[float]]) -> aiplatform.models.Prediction:
    return predict_at(vertex.standin, vertex.endpoint, instances)


def predict_at(
    standin: VertexStandIn, endpoint: str, instances: list[list[float]]
) -> aiplatform.models.Prediction:
    """The SDK's Endpoint.predict, as a user calls it."""
    aiplatform.init(
        project=standin.project_id,
        location=LOCATION,
        api_endpoint=standin.url,
        api_transport="rest",
        credentials=AnonymousCredentials(),
    )
    return aiplatform.Endpoint(endpoint).predict(instances=instances)


def test_a_model_rolls_out_to_vertex_as_champion_canary_promotion_and_rollback(
    cloud: Cloud, vertex: Vertex, iris_config: PipelineConfig, iris_csv: str, tmp_path: Path
) -> None:
    cloud.watch(events.DEPLOYMENT_COMPLETED)
    first = trained(cloud, iris_config, iris_csv)
    second = trained(cloud, iris_config, renamed_iris(iris_csv))

    # v1: acknowledged at once, DeploymentCompleted only when it serves.
    started = vertex.push(first)
    recorded_early = cloud.storage.exists(layout.RunPaths(first.context.run_id).deployment)
    vertex.finish()
    champion = predict(vertex, [SETOSA])
    after_v1 = vertex.deployed()
    serving_accounts = vertex.accounts()

    # v2 as a 10% canary; the same EvaluationCompleted delivered again while it rolls out,
    # and once more after.
    canary_started = vertex.push(second)
    redelivered = vertex.push(second)
    vertex.finish()
    redelivered_after = vertex.push(second)
    during = vertex.deployed()
    split_during = vertex.split()
    served = collections.Counter(predict(vertex, [SETOSA]).model_version_id for _ in range(1000))

    promoted = rollout.promote(vertex.deployer, MODEL, "test")
    vertex.finish()
    after_promotion = vertex.deployed()
    promoted_answer = predict(vertex, [SETOSA])

    rolled_back = rollout.rollback(vertex.deployer, MODEL, "test")
    vertex.finish()
    after_rollback = vertex.deployed()
    rolled_back_answer = predict(vertex, [SETOSA])
    published = cloud.pulled(events.DEPLOYMENT_COMPLETED, expect=5, timeout=30)
    containers = vertex.standin.containers()
    # Each model server the stand-in removed left its log: v1 and v2, undeployed once each.
    removed = sorted((tmp_path / "vertex-logs").glob(f"vertex-{vertex.standin.id}-*.log"))

    assert started.status == "rolling_out" and not recorded_early
    assert list(after_v1.values()) == ["1"]
    assert champion.predictions == ["setosa"] and champion.model_version_id == "1"
    assert champion.model_resource_name.startswith(f"projects/{PROJECT_NUMBER}/")
    assert serving_accounts == {SERVING_ACCOUNT}

    assert canary_started.status == "rolling_out"
    assert redelivered.status == "rolling_out"  # nothing started twice: one DeployModel
    assert redelivered_after.status == "duplicate"
    assert sorted(during.values()) == ["1", "2"]  # exactly one deployment per version
    assert split_during == {"1": 90, "2": 10}
    print(f"predictions per Vertex version over 1000 requests: {dict(served)}")
    assert sum(served.values()) == 1000
    assert 70 <= served["2"] <= 130, served  # 10% ± 3 points

    assert not promoted.finished and promoted.operations
    assert list(after_promotion.values()) == ["2"]  # the old champion is undeployed
    assert promoted_answer.predictions == [RENAMED["setosa"]]
    assert not rolled_back.finished
    assert list(after_rollback.values()) == ["1"]
    assert rolled_back_answer.predictions == ["setosa"]
    assert len(containers) == 1 and containers[0].endswith(next(iter(after_rollback)))
    assert len(removed) == 2, removed  # no deployment was ever started twice

    actions = [(events.rollout_action(e), e.version, e.deployed) for e in published]
    assert actions == [
        ("promote", 1, True),
        ("canary", 2, True),
        ("canary", 2, True),  # the redelivery after the rollout re-publishes the record
        ("promote", 2, True),
        ("rollback", 1, True),
    ]
    assert all(
        events.deploy_target(e) == "vertex" and vertex.endpoint in e.target_resource
        for e in published
    )
    assert [(t.version, t.percent) for t in published[1].traffic] == [(1, 90), (2, 10)]


def test_a_dropped_file_trains_as_a_custom_job_and_is_served_from_its_vertex_endpoint(
    cloud: Cloud,
    standin: VertexStandIn,
    predictor_image: str,
    trainer_image: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    iris_csv: str,
) -> None:
    config = parse_config(
        (REPO / "examples/iris/pipeline.yaml").read_text() + "training:\n  backend: vertex\n"
    )
    endpoint = new_endpoint(standin)
    for key, value in {
        "MLPIPE_PROJECT": cloud.project,
        "MLPIPE_BUCKET": cloud.storage.bucket_name,
        "MLPIPE_JOB_LOG_DIR": str(tmp_path / "jobs"),
        # trainer: CustomJobs of its own image, as its own account
        "MLPIPE_TRAINER_IMAGE": trainer_image,
        "MLPIPE_VERTEX_SERVICE_ACCOUNT": TRAINER_ACCOUNT,
        "MLPIPE_VERTEX_API_ENDPOINT": standin.url,
        # deployer: the vertex target
        "MLPIPE_DEPLOY_TARGET": "vertex",
        "MLPIPE_PREDICTOR_IMAGE": predictor_image,
        "MLPIPE_VERTEX_ENDPOINT": endpoint,
        "MLPIPE_VERTEX_SERVING_ACCOUNT": SERVING_ACCOUNT,
    }.items():
        monkeypatch.setenv(key, value)
    from mlpipe_deployer.main import app as deployer
    from mlpipe_evaluator.main import app as evaluator
    from mlpipe_trainer.main import app as trainer

    cloud.watch(events.TRAINING_COMPLETED, events.EVALUATION_COMPLETED, events.DEPLOYMENT_COMPLETED)
    cloud.apply_config(config)
    path, generation = upload(cloud, iris_csv)
    with TestClient(trainer) as t, TestClient(evaluator) as e, TestClient(deployer) as d:
        held = t.post("/pubsub/push", content=notification(cloud, path, generation))
        trained = cloud.pulled(events.TRAINING_COMPLETED, timeout=ROLLOUT_SECONDS)
        assert len(trained) == 1, "the CustomJob published no TrainingCompleted"
        forward(e, trained[0])
        evaluated = cloud.pulled(events.EVALUATION_COMPLETED, timeout=60)
        rolling_out = forward(d, evaluated[0])
        deployed: list[Any] = []
        checks = 0
        deadline = time.monotonic() + ROLLOUT_SECONDS
        while not deployed and time.monotonic() < deadline:
            checked = d.post("/v1/rollouts:check")
            assert checked.status_code == 200, checked.text
            checks += 1
            deployed = cloud.pulled(events.DEPLOYMENT_COMPLETED, timeout=1, settle=0)
        answer = predict_at(standin, endpoint, [SETOSA])
        again = forward(d, evaluated[0], n=2)
        after = d.post("/v1/rollouts:check").json()
    run_id = trained[0].context.run_id
    started = events.from_json(
        events_pb2.TrainingStarted, cloud.storage.read(layout.RunPaths(run_id).started).data
    )
    jobs = v1.JobServiceClient(**vertex_client_kwargs(LOCATION, standin.url))
    job = jobs.get_custom_job(name=started.job_id)
    found = v1.EndpointServiceClient(**vertex_client_kwargs(LOCATION, standin.url)).get_endpoint(
        name=endpoint
    )

    assert job_started(held), held.text
    assert job.state == v1.JobState.JOB_STATE_SUCCEEDED
    assert job.job_spec.service_account == TRAINER_ACCOUNT
    assert list(job.job_spec.worker_pool_specs[0].container_spec.command) == [
        "python", "-m", "mlpipe_trainer.job",
    ]  # fmt: skip
    assert evaluated[0].passed
    assert rolling_out["status"] == "rolling_out" and checks >= 1
    assert len(deployed) == 1 and deployed[0].deployed
    assert events.deploy_target(deployed[0]) == "vertex"
    assert deployed[0].target_resource.startswith(endpoint)
    assert answer.predictions == ["setosa"] and answer.model_version_id == "1"
    assert again["status"] == "duplicate" and after == {"rollouts": []}
    assert [(d.model_version_id, d.service_account) for d in found.deployed_models] == [
        ("1", SERVING_ACCOUNT)
    ]
