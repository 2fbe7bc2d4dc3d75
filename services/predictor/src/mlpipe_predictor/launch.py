"""Launching batch jobs (mlpipe_batch, a Beam pipeline), once per batch, from the push step.

    predictions/<model>/jobs/<batch_id>.json   created with create-if-absent: exactly one
                                               delivery launches; every other one (and every
                                               redelivery) finds it and starts nothing

The record names the launcher and its handle (a local process, or a Dataflow job). A
redelivery asks the launcher whether that job still runs: while it does the delivery is held
(503, Pub/Sub redelivers with backoff; the request's redeliveries are the check, no timer);
a job that ended without metrics or a failure record was lost, and is reported as failed.

The predictor never imports the job: the local launcher starts `python -m mlpipe_batch` as a
process (DirectRunner, multi-processing workers), never inside the request's handler thread's
work; the Dataflow launcher submits it through the Dataflow API.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from google.api_core import exceptions as gexc

from mlpipe.errors import PermanentError
from mlpipe.messaging.batch_jobs import JobSpec
from mlpipe.runtime import labels
from mlpipe.runtime.dataflow_jobs import FlexTemplateJobs
from mlpipe.runtime.job_process import (
    ENDED,
    JobProcesses,
    batch_job_installed,
    direct_runner_command,
)
from mlpipe.runtime.steps import StepResult, held
from mlpipe.store.storage import Storage

log = logging.getLogger(__name__)


class Launcher(Protocol):
    """Starts a batch job and tells whether one it started still runs."""

    name: str

    def launch(self, spec: JobSpec) -> dict[str, Any]:
        """Start the job; return its handle (kept in the job record)."""
        ...

    def state(self, handle: dict[str, Any]) -> str:
        """RUNNING, ENDED, or UNKNOWN (this launcher cannot see that job)."""
        ...

    def stop(self, handle: dict[str, Any]) -> None:
        """Stop the job (past its deadline)."""
        ...


@dataclass
class LocalLauncher:
    """`python -m mlpipe_batch` as a child process on the DirectRunner with `workers`
    processes (`mode` multi_processing; in_memory runs it in that one process); its output
    goes to a log file named in the handle (mlpipe.runtime.job_process).

    A worker process that dies leaves the DirectRunner's multi-processing driver waiting for
    it: such a job is ended by its deadline (JobLaunch.job_timeout_seconds), not noticed.
    """

    workers: int = 2
    mode: str = "multi_processing"
    log_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "mlpipe-batch")
    python: str = sys.executable
    name: str = "local"
    processes: JobProcesses = field(default_factory=JobProcesses)

    def command(self, spec: JobSpec) -> list[str]:
        return direct_runner_command(spec.to_json(), self.mode, self.workers, self.python)

    def launch(self, spec: JobSpec) -> dict[str, Any]:
        if not batch_job_installed():
            raise PermanentError(
                "batch_job_unavailable",
                f"batch {spec.batch_id}: the batch job (mlpipe_batch) is not installed here; "
                "launch batch jobs on Dataflow (MLPIPE_BATCH_LAUNCHER=dataflow) or score "
                "this input in the predictor (MLPIPE_BATCH_INLINE_MAX_BYTES)",
            )
        log_path = self.log_dir / f"{spec.model}-{spec.batch_id}-{int(time.time())}.log"
        handle = self.processes.start(self.command(spec), log_path)
        log.info(
            "batch %s: started local job pid %d (log %s)", spec.batch_id, handle["pid"], log_path
        )
        return handle

    def state(self, handle: dict[str, Any]) -> str:
        return self.processes.state(handle)

    def stop(self, handle: dict[str, Any]) -> None:
        self.processes.stop(handle)

    def wait(self, timeout: float) -> None:
        """Wait for every child this launcher started (tests, shutdown)."""
        self.processes.wait(timeout)


@dataclass
class JobLaunch:
    """The batch job of one request: launch it once, then follow it through its record."""

    storage: Storage
    launcher: Launcher
    # A record with no handle yet (its launch was cut short) this long is a lost launch.
    launch_timeout_seconds: float = 300.0
    # A job still running this long after its launch is stopped and reported as failed.
    job_timeout_seconds: float = 6 * 3600.0

    def follow(self, spec: JobSpec) -> StepResult:
        """Launch the job unless one was; held while it runs; PermanentError when it failed
        or was lost. The caller has checked that no metrics exist."""
        record = {
            "batch_id": spec.batch_id,
            "model": spec.model,
            "version": spec.version,
            "launcher": self.launcher.name,
            "spec": spec.to_json(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        generation = self.storage.create_if_absent(spec.job_path, _dumps(record))
        if generation is not None:
            try:
                handle = self.launcher.launch(spec)
            except Exception:
                # Not launched: the next delivery may try again (a refusal is reported once).
                with contextlib.suppress(gexc.PreconditionFailed):
                    self.storage.delete(spec.job_path, if_generation_match=generation)
                raise
            try:
                self.storage.write_json(
                    spec.job_path, {**record, "handle": handle}, if_generation_match=generation
                )
            except gexc.PreconditionFailed:
                log.warning("batch %s: its job record changed during launch", spec.batch_id)
            return held(
                f"batch {spec.batch_id} of {spec.model}: job started ({self.launcher.name}); "
                "acknowledged when its metrics are written",
                spec.context().run_id,
            )
        return self._existing(spec)

    def _existing(self, spec: JobSpec) -> StepResult:
        failure = self.storage.read_json(spec.failure_path)
        if failure is not None:
            self.forget(spec)
            raise PermanentError(
                f"batch_{failure.get('reason', 'failed')}",
                f"batch {spec.batch_id} of {spec.model} failed: {failure.get('message')}",
            )
        found = self.storage.read_json(spec.job_path) or {}
        handle = found.get("handle")
        if handle is None:
            created = dt.datetime.fromisoformat(found.get("created_at") or _now())
            age = (dt.datetime.now(dt.UTC) - created).total_seconds()
            if age > self.launch_timeout_seconds:
                self.forget(spec)
                raise PermanentError(
                    "batch_job_lost",
                    f"batch {spec.batch_id} of {spec.model}: its launch did not complete "
                    f"within {self.launch_timeout_seconds:.0f}s",
                )
            return held(f"batch {spec.batch_id} of {spec.model}: its job is being launched")
        state = self.launcher.state(handle)
        age = (
            dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(found["created_at"])
        ).total_seconds()
        if state != ENDED and age > self.job_timeout_seconds:
            self.launcher.stop(handle)
            self.forget(spec)
            raise PermanentError(
                "batch_job_timeout",
                f"batch {spec.batch_id} of {spec.model}: its job ({found.get('launcher')} "
                f"{handle}) ran past its deadline of {self.job_timeout_seconds:.0f}s; stopped",
            )
        if state == ENDED and not self.storage.exists(spec.metrics_path):
            # It may have recorded its failure as it ended.
            if self.storage.exists(spec.failure_path):
                return self._existing(spec)
            self.forget(spec)
            raise PermanentError(
                "batch_job_lost",
                f"batch {spec.batch_id} of {spec.model}: its job ({found.get('launcher')} "
                f"{handle}) ended without metrics or a failure record",
            )
        return held(
            f"batch {spec.batch_id} of {spec.model} is still running "
            f"({found.get('launcher')}); acknowledged when its metrics are written"
        )

    def forget(self, spec: JobSpec) -> None:
        """Drop the job's records, and whatever it wrote (it has no metrics: none of it is
        complete), once its failure is reported: a replay starts it again."""
        for path in self.storage.list(spec.output_prefix):
            self.storage.delete(path)
        self.storage.delete(spec.failure_path)
        self.storage.delete(spec.job_path)


def _dumps(value: dict[str, Any]) -> bytes:
    import json

    return json.dumps(value, indent=2, sort_keys=True).encode()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


@dataclass(frozen=True)
class DataflowOptions:
    """Where and how a batch job runs on Dataflow (the predictor's MLPIPE_BATCH_DATAFLOW_*
    settings, rendered from the environment file and infra/runtime.yaml by mlpipe_ops)."""

    project: str
    region: str
    template: (
        str  # gs://.../batch.json, the Flex Template spec file (cloudbuild/batch-template.yaml)
    )
    service_account: str = ""
    temp_location: str = ""
    staging_location: str = ""
    machine_type: str = ""
    max_workers: int = 0
    network: str = ""
    subnetwork: str = ""
    # Workers with internal IPs only (a subnetwork with Private Google Access).
    private_ips: bool = False
    endpoint: str = ""  # the API's endpoint when not Google's (a stand-in)
    env: str = ""  # the environment (MLPIPE_ENV): a label of the job's resources


def dataflow_job_name(spec: JobSpec) -> str:
    """A Dataflow job name for the batch: Dataflow keeps one active job of a name per project
    and region, so the name itself guards against a second launch of the same batch."""
    import hashlib

    base = re.sub(r"[^a-z0-9-]+", "-", f"mlpipe-batch-{spec.model}-{spec.batch_id}".lower())
    digest = hashlib.sha256(f"{spec.model}/{spec.batch_id}".encode()).hexdigest()[:8]
    return f"{base[:80].strip('-')}-{digest}"


def dataflow_labels(spec: JobSpec, env: str) -> dict[str, str]:
    """The labels of a batch job's Dataflow resources: the billing export carries them, so a
    batch's real cost is found by its id, model and environment (docs/cost.md), and by the
    run of its request when it has one; its pipeline is the model's name. Sanitised to
    Google's label rules (mlpipe.runtime.labels)."""
    return labels.labels(
        {"mlpipe-batch": "1", "mlpipe-batch-id": spec.batch_id, "mlpipe-model": spec.model}
    ) | labels.run_labels(spec.context().run_id, spec.model, env)


@dataclass
class DataflowLauncher:
    """Launches the batch job's Flex Template through the Dataflow API (google-cloud-dataflow-
    client, REST) and follows it with jobs.get."""

    options: DataflowOptions
    credentials: Any = None
    name: str = "dataflow"

    @property
    def jobs(self) -> FlexTemplateJobs:
        return FlexTemplateJobs(self.options.endpoint, self.credentials)

    def _clients(self) -> tuple[Any, Any]:
        return self.jobs.clients()

    def launch_request(self, spec: JobSpec) -> Any:
        o = self.options
        return FlexTemplateJobs.launch_request(
            project=o.project,
            region=o.region,
            job_name=dataflow_job_name(spec),
            template=o.template,
            parameters={"spec": spec.to_json()},
            environment={
                "service_account_email": o.service_account,
                "temp_location": o.temp_location,
                "staging_location": o.staging_location,
                "machine_type": o.machine_type,
                "max_workers": o.max_workers,
                "network": o.network,
                "subnetwork": o.subnetwork,
                "additional_user_labels": dataflow_labels(spec, o.env),
            },
            private_ips=o.private_ips,
        )

    def launch(self, spec: JobSpec) -> dict[str, Any]:
        handle = self.jobs.launch(self.launch_request(spec))
        log.info(
            "batch %s: launched Dataflow job %s (%s)",
            spec.batch_id,
            handle["job_id"],
            handle["name"],
        )
        return {
            **handle,
            # What its estimate prices (mlpipe.store.run_cost.batch_estimate).
            "machine_type": self.options.machine_type,
            "max_workers": self.options.max_workers,
        }

    def state(self, handle: dict[str, Any]) -> str:
        return self.jobs.state(handle)

    def stop(self, handle: dict[str, Any]) -> None:
        self.jobs.cancel(handle)


def batch_launcher(settings: Any) -> Launcher:
    """The launcher the predictor's settings name (PredictorSettings.batch_*)."""
    if settings.batch_launcher == "dataflow":
        credentials = None
        if settings.batch_dataflow_endpoint:
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()  # a stand-in signs nothing
        return DataflowLauncher(
            DataflowOptions(
                project=settings.project,
                region=settings.region,
                template=settings.batch_dataflow_template,
                service_account=settings.batch_dataflow_service_account,
                temp_location=settings.batch_dataflow_temp_location,
                staging_location=settings.batch_dataflow_staging_location,
                machine_type=settings.batch_dataflow_machine_type,
                max_workers=settings.batch_dataflow_max_workers,
                network=settings.batch_dataflow_network,
                subnetwork=settings.batch_dataflow_subnetwork,
                private_ips=settings.batch_dataflow_private_ips,
                endpoint=settings.batch_dataflow_endpoint,
                env=settings.env,
            ),
            credentials=credentials,
        )
    return LocalLauncher(workers=settings.batch_local_workers, mode=settings.batch_local_mode)
