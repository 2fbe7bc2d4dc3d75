"""The batch job as it ships: built from jobs/batch/Dockerfile as jobs/batch/cloudbuild.yaml
builds it, and run as Dataflow runs a Flex Template, in its image through the image's template
launcher. The predictor's real Dataflow client launches it against the local Dataflow
(mlpipe_ops.standins.dataflow, rule D12: jobs in the template's image), which runs the image
on the local Docker engine against the emulators.

Needs a Docker engine (`make test-containers` and .ci/run start one); skipped without one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials

from mlpipe.runtime.job_process import ENDED
from mlpipe.store import layout
from mlpipe.v1 import events_pb2
from mlpipe_ops import containers as docker
from mlpipe_ops.standins.dataflow import DataflowStandIn, template_spec
from mlpipe_predictor.launch import DataflowLauncher
from tests.conftest import REPO, engine_missing, wait_until
from tests.integration.conftest import Cloud, cloud, iris_config, iris_csv  # noqa: F401
from tests.integration.test_batch_dataflow import TEMPLATE, options, predictor_env
from tests.integration.test_batch_job import avro_records, iris_csv_with, push_request
from tests.integration.test_serving import deploy, predictor, trained

pytestmark = pytest.mark.containers


@pytest.fixture(scope="module")
def batch_image() -> str:
    missing = engine_missing()
    if missing:
        pytest.skip(missing)
    docker.ensure_base_images(REPO, print, batch=True)
    image, seconds = docker.build_batch(REPO)
    print(f"built {image} in {seconds:.1f}s")
    return image


@pytest.fixture
def dataflow(cloud: Cloud, batch_image: str, tmp_path: Path) -> Iterator[DataflowStandIn]:  # noqa: F811
    metadata = json.loads((REPO / "jobs/batch/metadata.json").read_text())
    cloud.storage.write(TEMPLATE, json.dumps(template_spec(batch_image, metadata)).encode())
    stand_in = DataflowStandIn(
        cloud.project, env=dict(os.environ), log_dir=tmp_path, containers=True
    ).start()
    yield stand_in
    stand_in.stop()


def test_a_batch_on_dataflow_runs_in_the_batch_jobs_image(
    cloud: Cloud,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    dataflow: DataflowStandIn,
    iris_config,  # noqa: F811
    iris_csv: str,  # noqa: F811
) -> None:
    deploy(cloud, trained(cloud, iris_config, iris_csv))
    cloud.storage.write("inputs/iris.csv", iris_csv_with(iris_csv).encode())
    request = events_pb2.BatchPredictionRequest(
        batch_id="in-the-image",
        model_name="iris-classifier",
        input_uri=cloud.storage.uri("inputs/iris.csv"),
        key_column="id",
    )
    metrics_path = layout.batch_metrics_path("iris-classifier", "in-the-image")

    o = options(cloud, dataflow)
    with predictor(cloud, monkeypatch, **predictor_env(o)) as served:
        first = push_request(served.url, cloud, request)
        (job,) = dataflow.jobs()
        try:
            wait_until(lambda: cloud.storage.exists(metrics_path), 240, "the job's metrics")
        except AssertionError:
            raise AssertionError(Path(job.log_path).read_text()[-3000:]) from None
        done = push_request(served.url, cloud, request)

    assert first.status_code == 503  # held while the job runs
    assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
    assert done.json()["rows"] == 150
    # It ran in the image, through the template launcher, not as a process here.
    assert job.container and job.process is not None
    assert job.process.args[:2] == ["docker", "run"] and dataflow.containers
    dataflow.wait(60)  # it publishes its completion after the metrics, then exits
    record = cloud.storage.read_json(layout.batch_job_path("iris-classifier", "in-the-image"))
    launcher = DataflowLauncher(o, credentials=AnonymousCredentials())
    assert launcher.state(record["handle"]) == ENDED
    assert job.resource()["currentState"] == "JOB_STATE_DONE", Path(job.log_path).read_text()
    metrics = cloud.storage.read_json(metrics_path)
    records = avro_records(cloud, metrics["output_uris"])
    assert len(records) == 150 and metrics["rows"] == 150
