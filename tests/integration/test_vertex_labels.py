"""The billing export's labels (run id, pipeline, environment) on what mlpipe makes in Vertex
AI, through the real google-cloud-aiplatform clients against the local Vertex AI
(mlpipe_ops.standins.vertex, rule 76): the trainer's CustomJob, the model versions the
deployer's vertex target uploads; and labels the rules refuse are refused."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from google.api_core import exceptions as gexc
from google.cloud import aiplatform_v1 as v1
from google.longrunning import operations_pb2

from mlpipe.ml.config import parse_config
from mlpipe.runtime.vertex_api import vertex_client_kwargs
from mlpipe.store.registry import ModelVersion, Traffic
from mlpipe_deployer.targets.vertex import VertexTarget as ServingTarget
from mlpipe_ops.standins.vertex import VertexStandIn
from mlpipe_trainer.vertex import VertexTarget, custom_job_request
from tests.conftest import REPO
from tests.unit.test_vertex_job import started_event

pytestmark = pytest.mark.integration

LOCATION = "us-central1"
NUMBER = "246813579024"


@pytest.fixture
def standin() -> Iterator[VertexStandIn]:
    # Jobs stay queued for a minute (rule 72: one cancelled while queued never starts), so
    # nothing runs: what is under test is what Vertex AI keeps of the request.
    vertex = VertexStandIn(
        f"vx-{uuid.uuid4().hex[:8]}", project_number=NUMBER, operation_seconds=60.0
    ).start()
    yield vertex
    vertex.stop()


def test_a_custom_job_keeps_the_runs_labels_and_a_label_the_rules_refuse_is_refused(
    standin: VertexStandIn,
) -> None:
    config = parse_config(
        (REPO / "examples/iris/pipeline.yaml").read_text() + "training:\n  backend: vertex\n"
    )
    target = VertexTarget(
        project=standin.project_id,
        bucket="b",
        image="local/trainer:never-run",
        code_version="ABC1234.dirty",
        env="Prod",
        service_account="trainer@example.iam.gserviceaccount.com",
        api_endpoint=standin.url,
    )
    started = started_event()
    jobs = v1.JobServiceClient(**vertex_client_kwargs(LOCATION, standin.url))
    request = custom_job_request(started, config, target)
    request.parent = f"projects/{standin.project_id}/locations/{LOCATION}"

    created = jobs.create_custom_job(request=request)
    jobs.cancel_custom_job(name=created.name)
    found = jobs.get_custom_job(name=created.name)
    request.custom_job.labels["Team"] = "ml"
    with pytest.raises(gexc.BadRequest, match=r"CustomJob\.labels: label key .Team. must start"):
        jobs.create_custom_job(request=request)

    assert dict(found.labels) == {
        "mlpipe-run-id": started.context.run_id,
        "mlpipe-pipeline": config.name,
        "mlpipe-env": "prod",
        "mlpipe-commit": "abc1234-dirty",
    }


def test_an_uploaded_model_version_carries_its_run_pipeline_and_environment(
    standin: VertexStandIn,
) -> None:
    standin.operation_seconds = 0.0  # uploads finish at once
    # UploadModel reads the image from the local engine (docker image inspect): any image
    # there will do, nothing runs it.
    image = "python:3.11.7-slim-bookworm"
    inspected = subprocess.run(
        ["docker", "image", "inspect", image], capture_output=True, check=False, timeout=30
    )
    if inspected.returncode != 0:
        pytest.skip(f"no local image {image} to upload a model with")
    endpoints = v1.EndpointServiceClient(**vertex_client_kwargs(LOCATION, standin.url))
    endpoint = endpoints.create_endpoint(
        parent=f"projects/{standin.project_id}/locations/{LOCATION}",
        endpoint=v1.Endpoint(display_name="iris"),
    ).result()
    version = ModelVersion(
        "iris-classifier",
        1,
        "0123456789abcdef",
        "gs://b/registry/iris-classifier/versions/1/model.joblib",
        "sha",
        {"pipeline": "Iris Flowers"},
    )
    target = ServingTarget(
        standin.project_id,
        LOCATION,
        endpoint.name.rsplit("/", 1)[1],
        image,
        "b",
        "abc1234",
        api_endpoint=standin.url,
        env="dev",
    )

    started = target.apply("iris-classifier", Traffic(1), {1: version})

    models = v1.ModelServiceClient(**vertex_client_kwargs(LOCATION, standin.url))
    assert len(started.operations) == 1 and not started.error, started
    deadline = time.monotonic() + 30
    while not models.get_operation(
        operations_pb2.GetOperationRequest(name=started.operations[0])
    ).done:
        assert time.monotonic() < deadline, "the upload did not finish"
        time.sleep(0.1)
    (uploaded,) = models.list_model_versions(
        name=f"projects/{standin.project_id}/locations/{LOCATION}/models/iris-classifier"
    )
    assert {k: uploaded.labels[k] for k in ("mlpipe-run-id", "mlpipe-pipeline", "mlpipe-env")} == {
        "mlpipe-run-id": "0123456789abcdef",
        "mlpipe-pipeline": "iris-flowers",
        "mlpipe-env": "dev",
    }
