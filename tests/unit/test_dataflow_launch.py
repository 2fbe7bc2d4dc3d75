"""The batch job's Dataflow launch request (pure: built without reaching Google)."""

from __future__ import annotations

from mlpipe.messaging.batch_jobs import JobSpec
from mlpipe_predictor.launch import DataflowLauncher, DataflowOptions


def test_a_batch_jobs_resources_carry_its_batch_model_and_environment_as_labels() -> None:
    spec = JobSpec(
        project="acme-ml",
        bucket="acme-ml-data",
        batch_id="Nightly_2026.12.02",
        model="iris-classifier",
        version=3,
        input_uri="gs://acme-ml-data/inputs/nightly.csv",
        output_prefix="predictions/iris-classifier/dt=2026-12-02/nightly/",
    )
    options = DataflowOptions("acme-ml", "us-central1", "gs://t/batch.json", env="prod")

    request = DataflowLauncher(options).launch_request(spec)

    assert dict(request.launch_parameter.environment.additional_user_labels) == {
        "mlpipe-batch": "1",
        "mlpipe-batch-id": "nightly_2026-12-02",  # label values: lowercase, no dots
        "mlpipe-model": "iris-classifier",
        "mlpipe-env": "prod",
        # A batch's pipeline is its model's; a request without a run names none.
        "mlpipe-pipeline": "iris-classifier",
    }
