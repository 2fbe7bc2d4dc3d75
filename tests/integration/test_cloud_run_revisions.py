"""The predictor image as Cloud Run revisions: the deployer's Cloud Run target, through the
real `google-cloud-run` client, against the local Cloud Run Admin API running each revision's
container under Cloud Run's contract (mlpipe_ops.standins.cloud_run, run_containers=True), with
models from the registry in the GCS emulator.

The revision env is the one infra/runtime.yaml and the environment file give the predictor,
plus the two variables a model rollout pins; the sequence is a model rollout (v1, then a 10%
canary of v2), a code release, then the promotion."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import run_v2

from mlpipe.ml.config import PipelineConfig
from mlpipe.store.registry import Registry, Traffic
from mlpipe_deployer.targets.cloud_run import CloudRunTarget, release_fingerprint, revision_name
from mlpipe_ops import containers, infra, service_runtime
from mlpipe_ops.standins.cloud_run import CloudRunStandIn
from tests.integration.conftest import Cloud
from tests.integration.test_serving import deploy, renamed_iris, trained

pytestmark = pytest.mark.cloud

REPO = Path(__file__).resolve().parents[2]
NUMBER = 123456789012
REGION = "us-central1"
SERVICE_ID = "mlpipe-predictor"


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def predictor_image() -> str:
    try:
        containers.check_engine()
    except containers.DockerError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no Docker engine: {exc}")
    image, _ = containers.build("predictor", REPO, "cloud-run-revisions")
    return image


@pytest.fixture
def stand_in(cloud: Cloud) -> Iterator[CloudRunStandIn]:
    hosts = {k: os.environ[k] for k in ("STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST")}
    run = CloudRunStandIn(
        cloud.project,
        project_number=str(NUMBER),
        operation_seconds=0.2,
        run_containers=True,
        cloud_env=hosts,
    ).start()
    yield run
    run.stop()


def release_template(cloud: Cloud, image: str, commit: str) -> run_v2.RevisionTemplate:
    """The predictor's revision as a code release deploys it in dev, in this test's project
    and bucket on the emulators."""
    runtime = service_runtime.load_runtimes("dev", REPO / "infra" / "runtime.yaml")["predictor"]
    target = infra.resolve(
        infra.load_environment("dev", REPO / "infra" / "environments"),
        "dev",
        project=cloud.project,
        project_number=NUMBER,
        bucket=cloud.storage.bucket.name,
    )
    revision = service_runtime.cloud_run_revision(
        target, "predictor", runtime, image=image, code_version=commit
    )
    return run_v2.RevisionTemplate(
        service_account=revision.service_account,
        max_instance_request_concurrency=revision.concurrency,
        containers=[
            run_v2.Container(
                image=revision.image,
                env=[run_v2.EnvVar(name=k, value=v) for k, v in revision.env.items()],
                resources=run_v2.ResourceRequirements(
                    limits={"cpu": revision.cpu, "memory": revision.memory}
                ),
            )
        ],
    )


def test_model_rollout_then_code_release_then_promotion_on_running_revisions(
    cloud: Cloud,
    stand_in: CloudRunStandIn,
    predictor_image: str,
    iris_config: PipelineConfig,
    iris_csv: str,
) -> None:
    registry = Registry(cloud.storage)
    v1 = deploy(cloud, trained(cloud, iris_config, iris_csv))
    model = v1.model_name
    deploy(cloud, trained(cloud, iris_config, renamed_iris(iris_csv)), canary_percent=10)
    assert registry.traffic(model) == Traffic(1, 2, 10, history=registry.traffic(model).history)
    versions = {v: registry.get(model, v) for v in registry.versions(model)}

    options = stand_in.client_options()
    credentials = AnonymousCredentials()
    services = run_v2.ServicesClient(
        transport="rest", client_options=options, credentials=credentials
    )
    revisions = run_v2.RevisionsClient(
        transport="rest", client_options=options, credentials=credentials
    )
    path = f"projects/{cloud.project}/locations/{REGION}/services/{SERVICE_ID}"
    target = CloudRunTarget(
        cloud.project,
        REGION,
        SERVICE_ID,
        predictor_image,
        "test",
        services=services,
        revisions=revisions,
    )

    def roll_out(traffic: Traffic) -> None:
        rollout = target.apply(model, traffic, versions)
        deadline = time.monotonic() + 600
        while not rollout.done:
            assert time.monotonic() < deadline, rollout
            time.sleep(1.0)
            rollout = target.apply(model, traffic, versions, rollout.operations)

    def served() -> list[tuple[str, int]]:
        service = services.get_service(name=path)
        return sorted((t.revision, t.percent) for t in service.traffic_statuses if t.percent)

    def models_of(revision: str) -> dict[str, Any]:
        answer = httpx.get(f"{stand_in.revision_url(revision)}/v1/models", timeout=30)
        answer.raise_for_status()
        return dict(answer.json()["models"])

    def release(commit: str, *, create: bool = False) -> None:
        template = release_template(cloud, predictor_image, commit)
        if create:
            services.create_service(
                parent=f"projects/{cloud.project}/locations/{REGION}",
                service=run_v2.Service(template=template),
                service_id=SERVICE_ID,
            )
        else:
            service = services.get_service(name=path)
            service.template = template
            services.update_service(service=service)
        wait_for(lambda: not services.get_service(name=path).reconciling, 300, "the release")

    # The first code release: one revision that pins nothing and serves what the registry says.
    release("a" * 40, create=True)
    first = services.get_service(name=path).latest_created_revision.rsplit("/", 1)[-1]
    assert models_of(first)[model]["traffic"] == [
        {"version": 1, "alias": "champion", "percent": 90},
        {"version": 2, "alias": "canary", "percent": 10},
    ]

    roll_out(Traffic(1))
    roll_out(registry.traffic(model))

    old = release_fingerprint(services.get_service(name=path).template)
    rev1, rev2 = (revision_name(SERVICE_ID, model, v, old) for v in (1, 2))
    assert served() == [(rev1, 90), (rev2, 10)]
    # Each revision's container started with the pinned version and serves only it.
    assert models_of(rev1)[model]["version"] == 1
    assert models_of(rev2)[model]["version"] == 2
    assert [t["version"] for t in models_of(rev2)[model]["traffic"]] == [2]

    release("b" * 40)
    assert served() == [(rev1, 90), (rev2, 10)]  # the release's own revision gets nothing

    registry.promote(model)
    roll_out(registry.traffic(model))

    new = release_fingerprint(services.get_service(name=path).template)
    final = revision_name(SERVICE_ID, model, 2, new)
    assert served() == [(final, 100)]
    running = revisions.get_revision(name=f"{path}/revisions/{final}")
    env = {e.name: e.value for e in running.containers[0].env}
    assert env["MLPIPE_CODE_VERSION"] == "b" * 40 and env["MLPIPE_SERVE_VERSION"] == "2"
    assert models_of(final)[model]["version"] == 2
    ready = httpx.get(f"{stand_in.revision_url(final)}/readyz", timeout=30)
    assert ready.status_code == 200
