"""Vertex AI training backend: the same job entry point, run as a Vertex AI CustomJob from the
trainer's own image on the machine (and accelerators) the pipeline config asks for.

`custom_job_request` is pure, so the exact request is tested without reaching Google. The
Vertex AI client is imported on first use: it takes seconds of CPU, which every trainer start
would pay for a backend most pipelines never use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlpipe import tracing
from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.ml.config import PipelineConfig
from mlpipe.runtime.labels import run_labels
from mlpipe.runtime.vertex_api import vertex_client_kwargs
from mlpipe.store import layout
from mlpipe.v1 import events_pb2

if TYPE_CHECKING:
    from google.cloud import aiplatform_v1

JOB_COMMAND = ["python", "-m", "mlpipe_trainer.job"]


@dataclass(frozen=True)
class VertexTarget:
    project: str
    bucket: str
    image: str  # the trainer's image: it contains the job entry point
    code_version: str
    env: str
    # The account a job runs as when its pipeline names none: the trainer's own, which may
    # publish TrainingCompleted and write the run (MLPIPE_VERTEX_SERVICE_ACCOUNT).
    service_account: str = ""
    api_endpoint: str = ""  # default: the region's host (MLPIPE_VERTEX_API_ENDPOINT)
    api_transport: str = ""  # default: grpc, or rest for an http:// endpoint


def custom_job_request(
    started: events_pb2.TrainingStarted, config: PipelineConfig, target: VertexTarget
) -> aiplatform_v1.CreateCustomJobRequest:
    from google.cloud import aiplatform_v1

    spec = config.training.vertex
    machine = aiplatform_v1.MachineSpec(machine_type=spec.machine_type)
    if spec.accelerator_type:
        accelerator = getattr(aiplatform_v1.AcceleratorType, spec.accelerator_type, None)
        if accelerator is None or spec.accelerator_type.startswith("ACCELERATOR_TYPE_"):
            known = [a.name for a in aiplatform_v1.AcceleratorType if a.value]  # type: ignore[attr-defined]
            raise PermanentError(
                "invalid_config",
                f"training.vertex.accelerator_type {spec.accelerator_type!r} is not a Vertex "
                f"AI accelerator; one of {known}",
            )
        machine.accelerator_type = accelerator
        machine.accelerator_count = spec.accelerator_count
    # Without one, a CustomJob runs as Vertex AI's Custom Code Service Agent, which may not
    # publish TrainingCompleted: the run would train and never be heard of.
    account = spec.service_account or target.service_account
    if not account:
        raise PermanentError(
            "invalid_config",
            f"pipeline {config.name} trains on Vertex AI, but no service account is set for "
            "its job: set training.vertex.service_account, or MLPIPE_VERTEX_SERVICE_ACCOUNT "
            "(the trainer's own account) on the trainer",
        )
    run_id = started.context.run_id
    container = aiplatform_v1.ContainerSpec(
        image_uri=target.image,
        command=JOB_COMMAND,
        args=["--started", events.to_json(started)],
        env=[
            aiplatform_v1.EnvVar(name="MLPIPE_PROJECT", value=target.project),
            aiplatform_v1.EnvVar(name="MLPIPE_BUCKET", value=target.bucket),
            aiplatform_v1.EnvVar(name="MLPIPE_CODE_VERSION", value=target.code_version),
            aiplatform_v1.EnvVar(name="MLPIPE_ENV", value=target.env),
            # The job's spans join the trainer's trace, exported where the trainer's go.
            *(
                aiplatform_v1.EnvVar(name=name, value=value)
                for name, value in sorted(tracing.job_environment().items())
            ),
        ],
    )
    job = aiplatform_v1.CustomJob(
        display_name=f"mlpipe-{config.name}-{run_id}",
        job_spec=aiplatform_v1.CustomJobSpec(
            worker_pool_specs=[
                aiplatform_v1.WorkerPoolSpec(
                    machine_spec=machine, replica_count=1, container_spec=container
                )
            ],
            service_account=account,
            base_output_directory=aiplatform_v1.GcsDestination(
                output_uri_prefix=f"gs://{target.bucket}/{layout.RunPaths(run_id).vertex_output}"
            ),
        ),
        # The billing export carries these: a run's real cost is its rows (docs/cost.md).
        labels=run_labels(run_id, config.name, target.env, mlpipe_commit=target.code_version),
    )
    return aiplatform_v1.CreateCustomJobRequest(
        parent=f"projects/{target.project}/locations/{spec.region}", custom_job=job
    )


ClientFactory = Callable[[str], "aiplatform_v1.JobServiceClient"]


def regional_client(region: str) -> aiplatform_v1.JobServiceClient:
    from google.cloud import aiplatform_v1

    return aiplatform_v1.JobServiceClient(**vertex_client_kwargs(region))


class VertexJobLauncher:
    backend = "vertex"
    # A CustomJob may queue for its machine before its first claim renewal: until then the
    # claim holds this long (mlpipe_trainer.lease).
    start_lease_seconds = 3600.0

    def __init__(self, target: VertexTarget, client_factory: ClientFactory | None = None):
        self.target = target
        self.client_factory = client_factory or self._client

    def _client(self, region: str) -> aiplatform_v1.JobServiceClient:
        from google.cloud import aiplatform_v1

        kwargs = vertex_client_kwargs(region, self.target.api_endpoint, self.target.api_transport)
        return aiplatform_v1.JobServiceClient(**kwargs)

    def launch(self, started: events_pb2.TrainingStarted, config: PipelineConfig) -> str:
        request = custom_job_request(started, config, self.target)
        client = self.client_factory(config.training.vertex.region)
        job = client.create_custom_job(request=request)
        return str(job.name)
