"""The predictor's Dataflow launcher at its client boundary: the real google-cloud-dataflow-
client (REST) against the local Dataflow (mlpipe_ops.standins.dataflow, rules in
docs/dataflow-standin.md), whose jobs run the batch job's pipeline on the emulators."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import dataflow_v1beta3

from mlpipe.messaging.batch_jobs import JobSpec
from mlpipe.runtime.job_process import ENDED, RUNNING
from mlpipe.store import layout
from mlpipe.v1 import events_pb2
from mlpipe_ops import service_runtime
from mlpipe_ops.standins.dataflow import JOB_STATES, DataflowStandIn, template_spec
from mlpipe_predictor.launch import DataflowLauncher, DataflowOptions, dataflow_job_name
from tests.conftest import REPO, wait_until
from tests.integration.conftest import Cloud
from tests.integration.test_batch_job import iris_csv_with, push_request
from tests.integration.test_serving import deploy, predictor, trained

pytestmark = pytest.mark.integration

TEMPLATE = "templates/batch.json"


@pytest.fixture
def dataflow(cloud: Cloud, tmp_path) -> Iterator[DataflowStandIn]:
    metadata = json.loads((REPO / "jobs/batch/metadata.json").read_text())
    spec = template_spec("us-docker.pkg.dev/p/mlpipe/batch:test", metadata)
    cloud.storage.write(TEMPLATE, json.dumps(spec).encode())
    stand_in = DataflowStandIn(cloud.project, env=dict(os.environ), log_dir=tmp_path).start()
    yield stand_in
    stand_in.stop()


def options(cloud: Cloud, stand_in: DataflowStandIn, **changes) -> DataflowOptions:
    bucket = cloud.storage.bucket_name
    return DataflowOptions(
        **{
            "project": cloud.project,
            "region": "us-central1",
            "template": f"gs://{bucket}/{TEMPLATE}",
            "service_account": f"mlpipe-predictor@{cloud.project}.iam.gserviceaccount.com",
            "temp_location": f"gs://{bucket}/dataflow/temp",
            "staging_location": f"gs://{bucket}/dataflow/staging",
            "machine_type": "n2-standard-4",
            "max_workers": 8,
            "network": "mlpipe",
            "endpoint": stand_in.url,
            **changes,
        }
    )


def predictor_env(o: DataflowOptions) -> dict[str, str]:
    """The predictor's settings that launch every batch on Dataflow with `o`."""
    return {
        "MLPIPE_BATCH_INLINE_MAX_BYTES": "0",
        "MLPIPE_BATCH_LAUNCHER": "dataflow",
        "MLPIPE_REGION": o.region,
        "MLPIPE_BATCH_DATAFLOW_TEMPLATE": o.template,
        "MLPIPE_BATCH_DATAFLOW_SERVICE_ACCOUNT": o.service_account,
        "MLPIPE_BATCH_DATAFLOW_TEMP_LOCATION": o.temp_location,
        "MLPIPE_BATCH_DATAFLOW_STAGING_LOCATION": o.staging_location,
        "MLPIPE_BATCH_DATAFLOW_MACHINE_TYPE": o.machine_type,
        "MLPIPE_BATCH_DATAFLOW_MAX_WORKERS": str(o.max_workers),
        "MLPIPE_BATCH_DATAFLOW_NETWORK": o.network,
        "MLPIPE_BATCH_DATAFLOW_ENDPOINT": o.endpoint,
    }


def test_a_batch_request_runs_as_one_dataflow_job_however_often_it_is_delivered(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    dataflow: DataflowStandIn,
    iris_config,
    iris_csv: str,
) -> None:
    deploy(cloud, trained(cloud, iris_config, iris_csv))
    cloud.storage.write("inputs/iris.csv", iris_csv_with(iris_csv).encode())
    request = events_pb2.BatchPredictionRequest(
        batch_id="on-dataflow",
        model_name="iris-classifier",
        input_uri=cloud.storage.uri("inputs/iris.csv"),
        key_column="id",
    )
    o = options(cloud, dataflow)
    # With sizes and prices, as the local stack gives them: it estimates the finished batch.
    env = predictor_env(o) | service_runtime.cost_environment("local")
    metrics_path = layout.batch_metrics_path("iris-classifier", "on-dataflow")

    with predictor(cloud, monkeypatch, **env) as served:
        with ThreadPoolExecutor(3) as pool:
            first = list(pool.map(lambda _: push_request(served.url, cloud, request), range(3)))
        wait_until(lambda: cloud.storage.exists(metrics_path), 120, "the Dataflow job's metrics")
        done = push_request(served.url, cloud, request)

    assert [r.status_code for r in first] == [503] * 3
    (job,) = dataflow.jobs()
    launches = [body for method, path, body in dataflow.seen if path.endswith(":launch")]
    assert len(launches) == 1
    sent = launches[0]["launchParameter"]
    spec = JobSpec.from_json(sent["parameters"]["spec"])
    assert sent["jobName"] == job.name == dataflow_job_name(spec)
    assert sent["containerSpecGcsPath"] == o.template
    assert sent["environment"] == {
        "serviceAccountEmail": o.service_account,
        "tempLocation": o.temp_location,
        "stagingLocation": o.staging_location,
        "machineType": "n2-standard-4",
        "maxWorkers": 8,
        "network": "mlpipe",
        # The predictor's environment (MLPIPE_ENV, "local" here): the billing export's labels.
        "additionalUserLabels": {
            "mlpipe-batch": "1",
            "mlpipe-batch-id": "on-dataflow",
            "mlpipe-model": "iris-classifier",
            "mlpipe-env": "local",
            "mlpipe-pipeline": "iris-classifier",
        },
    }
    assert spec.batch_id == "on-dataflow" and spec.version == 1
    record = cloud.storage.read_json(layout.batch_job_path("iris-classifier", "on-dataflow"))
    assert record["launcher"] == "dataflow" and record["handle"]["job_id"] == job.id
    assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
    assert done.json()["rows"] == 150
    dataflow.wait(30)  # it publishes its completion after the metrics, then exits
    launcher = DataflowLauncher(o, credentials=AnonymousCredentials())
    assert launcher.state(record["handle"]) == ENDED
    assert job.resource()["currentState"] == "JOB_STATE_DONE"
    # The job carries the labels, as Dataflow returns them through the client library.
    _, jobs = launcher._clients()
    got = jobs.get_job(
        request=dataflow_v1beta3.GetJobRequest(
            project_id=cloud.project, location=o.region, job_id=job.id
        )
    )
    assert dict(got.labels) == sent["environment"]["additionalUserLabels"]
    # The finished batch's estimate: 8 workers (max_workers) of n2-standard-4 for its duration.
    metrics = cloud.storage.read_json(metrics_path)
    cost = cloud.storage.read_json(layout.batch_cost_path("iris-classifier", "on-dataflow"))
    assert cost is not None and "estimate" in cost, cost
    found = cost["estimate"]
    assert (found["runner"], found["workers"], found["machine_type"]) == (
        "dataflow",
        8,
        "n2-standard-4",
    )
    hours = 8 * metrics["duration_seconds"] / 3600
    prices = service_runtime.load_prices()
    assert found["worker_hours"] == pytest.approx(hours)
    assert found["cost"] == pytest.approx(
        hours * 4 * prices.price("dataflow_batch.vcpu_hour")
        + hours * 16 * prices.price("dataflow_batch.gb_hour")
    )


def test_the_launcher_follows_and_cancels_its_job_and_the_api_refuses_what_it_should(
    cloud: Cloud, dataflow: DataflowStandIn
) -> None:
    # A job that only waits: its state is what is under test.
    dataflow.command = [sys.executable, "-c", "import time; time.sleep(60)"]
    launcher = DataflowLauncher(options(cloud, dataflow), credentials=AnonymousCredentials())
    spec = JobSpec(
        project=cloud.project,
        bucket=cloud.storage.bucket_name,
        batch_id="waits",
        model="iris-classifier",
        version=1,
        input_uri=cloud.storage.uri("inputs/none.csv"),
        output_prefix="predictions/iris-classifier/dt=2026-12-02/waits/",
    )

    handle = launcher.launch(spec)
    again = launcher.launch(spec)  # the same name while it is active: that same job
    running = launcher.state(handle)
    launcher.stop(handle)
    stopped = launcher.state(handle)
    too_many = DataflowLauncher(options(cloud, dataflow, max_workers=2000), AnonymousCredentials())
    no_template = DataflowLauncher(
        options(cloud, dataflow, template=f"gs://{cloud.storage.bucket_name}/templates/none.json"),
        AnonymousCredentials(),
    )

    # D11: the stand-in reads JobState numbers as the client library numbers them.
    assert list(JOB_STATES) == [s.name for s in sorted(dataflow_v1beta3.JobState, key=int)]
    assert again["job_id"] == handle["job_id"] and len(dataflow.jobs()) == 1
    assert (running, stopped) == (RUNNING, ENDED)
    assert dataflow.jobs()[0].resource()["currentState"] == "JOB_STATE_CANCELLED"
    with pytest.raises(gexc.BadRequest, match="maxWorkers 2000"):
        too_many.launch(spec)
    with pytest.raises(gexc.BadRequest, match=r"templates/none\.json"):
        no_template.launch(spec)
    # D13: labels that break Google's label rules are refused, naming the label.
    templates, _ = launcher._clients()
    request = launcher.launch_request(spec)
    request.launch_parameter.job_name = "mlpipe-bad-labels"
    request.launch_parameter.environment.additional_user_labels["Team"] = "ml"
    with pytest.raises(gexc.BadRequest, match="label key 'Team' must start with a lowercase"):
        templates.launch_flex_template(request=request)
    with pytest.raises(gexc.NotFound):
        launcher.state({**handle, "job_id": "2026-12-02_00_00_00-1"})
    deadline = time.monotonic() + 5
    while dataflow.jobs()[0].process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dataflow.jobs()[0].process.poll() is not None
