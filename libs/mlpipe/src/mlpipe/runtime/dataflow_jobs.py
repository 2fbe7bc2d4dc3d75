"""A Beam job's Flex Template on Dataflow, through the official client
(google-cloud-dataflow-client, REST): launched, followed with jobs.get, cancelled with
jobs.update. The predictor's batch launcher and ingest's validation launcher both use it; each
names its own job, parameters and labels.

References (cloud.google.com/dataflow/docs/reference/rest/v1b3/): projects.locations.
flexTemplates/launch, projects.locations.jobs/get and projects.locations.jobs/update; the local
Dataflow stand-in answers as they say (docs/dataflow-standin.md, rules D1, D7, D9).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc

from mlpipe.runtime.job_process import ENDED, RUNNING

# The states a job does not leave (JobState: DONE, FAILED, CANCELLED, UPDATED, DRAINED).
ENDED_STATES = (
    "JOB_STATE_DONE",
    "JOB_STATE_FAILED",
    "JOB_STATE_CANCELLED",
    "JOB_STATE_UPDATED",
    "JOB_STATE_DRAINED",
)


@dataclass
class FlexTemplateJobs:
    """The Dataflow API at `endpoint` (Google's when empty; a stand-in's otherwise)."""

    endpoint: str = ""
    credentials: Any = None

    def clients(self) -> tuple[Any, Any]:
        """(FlexTemplatesServiceClient, JobsV1Beta3Client) over REST."""
        from google.cloud import dataflow_v1beta3 as dataflow

        kwargs: dict[str, Any] = {"transport": "rest"}
        if self.endpoint:
            kwargs["client_options"] = {"api_endpoint": self.endpoint}
        if self.credentials is not None:
            kwargs["credentials"] = self.credentials
        return dataflow.FlexTemplatesServiceClient(**kwargs), dataflow.JobsV1Beta3Client(**kwargs)

    @staticmethod
    def launch_request(
        *,
        project: str,
        region: str,
        job_name: str,
        template: str,
        parameters: Mapping[str, str],
        environment: Mapping[str, Any],
        private_ips: bool = False,
    ) -> Any:
        """The LaunchFlexTemplateRequest: `environment` holds FlexTemplateRuntimeEnvironment's
        fields (service_account_email, temp_location, machine_type, max_workers,
        additional_user_labels...); `private_ips` gives the workers no public address."""
        from google.cloud import dataflow_v1beta3 as dataflow

        runtime = dataflow.FlexTemplateRuntimeEnvironment(
            **environment,
            ip_configuration=(
                dataflow.WorkerIPAddressConfiguration.WORKER_IP_PRIVATE
                if private_ips
                else dataflow.WorkerIPAddressConfiguration.WORKER_IP_UNSPECIFIED
            ),
        )
        return dataflow.LaunchFlexTemplateRequest(
            project_id=project,
            location=region,
            launch_parameter=dataflow.LaunchFlexTemplateParameter(
                job_name=job_name,
                container_spec_gcs_path=template,
                parameters=dict(parameters),
                environment=runtime,
            ),
        )

    def launch(self, request: Any) -> dict[str, Any]:
        """Launch; the job's handle: job_id, name, project, region."""
        templates, _ = self.clients()
        job = templates.launch_flex_template(request=request).job
        return {
            "job_id": job.id,
            "name": job.name,
            "project": job.project_id or request.project_id,
            "region": job.location or request.location,
        }

    def state(self, handle: Mapping[str, Any]) -> str:
        """RUNNING, or ENDED once the job is in a state it does not leave."""
        from google.cloud import dataflow_v1beta3 as dataflow

        _, jobs = self.clients()
        job = jobs.get_job(
            request=dataflow.GetJobRequest(
                project_id=handle["project"], location=handle["region"], job_id=handle["job_id"]
            )
        )
        return ENDED if dataflow.JobState(job.current_state).name in ENDED_STATES else RUNNING

    def cancel(self, handle: Mapping[str, Any]) -> None:
        """Ask for the job's cancellation; a job already ended or gone is left as it is."""
        from google.cloud import dataflow_v1beta3 as dataflow

        _, jobs = self.clients()
        with contextlib.suppress(gexc.FailedPrecondition, gexc.NotFound):
            jobs.update_job(
                request=dataflow.UpdateJobRequest(
                    project_id=handle["project"],
                    location=handle["region"],
                    job_id=handle["job_id"],
                    job=dataflow.Job(requested_state=dataflow.JobState.JOB_STATE_CANCELLED),
                )
            )
