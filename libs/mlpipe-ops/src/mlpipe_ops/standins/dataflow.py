"""A local Dataflow: the part of the v1b3 REST API the predictor's batch launcher uses,
answering as the reference says, driven by the real `google-cloud-dataflow-client` over REST
(`transport="rest"`, `client_options={"api_endpoint": stand_in.url}`, anonymous credentials):

- flexTemplates.launch: reads the template spec file (containerSpecGcsPath) from the bucket,
  checks the request, and starts the job;
- jobs.get and jobs.update (requestedState JOB_STATE_CANCELLED) on the regional path.

A job runs the template's pipeline locally: the stand-in's `command` (by default
`python -m mlpipe_batch`) with each template parameter as `--<name>=<value>`, on the
DirectRunner against the emulators, as a process of its own; its state follows the process.
With `containers`, the job runs in the template's image instead, through the image's Flex
Template launcher, as Dataflow's launcher VM runs it (D12).

Every rule and its source are in docs/dataflow-standin.md (D1..D10); the comments name them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from google.cloud import storage

from mlpipe_ops.standins.google_api import (
    ApiError,
    check_labels,
    close,
    dumps,
    json_handler,
    serve,
    timestamp,
)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# D12: where the Flex Template launcher sits in a template's image (jobs/batch/Dockerfile).
TEMPLATE_LAUNCHER = "/opt/google/dataflow/python_template_launcher"
# D2: Job.name.
JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,1022}[a-z0-9])?$")
LAUNCH = re.compile(
    r"^/v1b3/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/flexTemplates:launch$"
)
JOB = re.compile(
    r"^/v1b3/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/jobs/(?P<job>[^/]+)$"
)
# D11: JobState's numbers, for a client that sends enums as numbers (`$alt=json;enum-encoding=int`).
JOB_STATES = (
    "JOB_STATE_UNKNOWN",
    "JOB_STATE_STOPPED",
    "JOB_STATE_RUNNING",
    "JOB_STATE_DONE",
    "JOB_STATE_FAILED",
    "JOB_STATE_CANCELLED",
    "JOB_STATE_UPDATED",
    "JOB_STATE_DRAINING",
    "JOB_STATE_DRAINED",
    "JOB_STATE_PENDING",
    "JOB_STATE_CANCELLING",
    "JOB_STATE_QUEUED",
    "JOB_STATE_RESOURCE_CLEANING_UP",
    "JOB_STATE_PAUSING",
    "JOB_STATE_PAUSED",
)
# D8: the states a job never leaves.
TERMINAL = {
    "JOB_STATE_DONE",
    "JOB_STATE_FAILED",
    "JOB_STATE_CANCELLED",
    "JOB_STATE_UPDATED",
    "JOB_STATE_DRAINED",
}


@dataclass
class Job:
    id: str
    project: str
    location: str
    name: str
    parameters: dict[str, str]
    environment: dict[str, Any]
    created: str
    state: str = "JOB_STATE_QUEUED"
    state_time: str = ""
    process: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    image: str = ""
    container: str = ""  # the job's container, when it runs in the template's image

    def resource(self) -> dict[str, Any]:
        # D7: the Job resource's fields (camelCase in JSON).
        return {
            "id": self.id,
            "projectId": self.project,
            "name": self.name,
            "type": "JOB_TYPE_BATCH",
            "location": self.location,
            "currentState": self.state,
            "currentStateTime": self.state_time or self.created,
            "createTime": self.created,
            # D13: the launch's additionalUserLabels are the job's labels.
            "labels": dict(self.environment.get("additionalUserLabels") or {}),
        }


@dataclass
class DataflowStandIn:
    project: str
    # The template's pipeline, run locally (D10); its arguments follow.
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "mlpipe_batch"])
    runner_args: list[str] = field(
        default_factory=lambda: ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
    )
    env: dict[str, str] | None = None
    log_dir: Path = field(default_factory=lambda: Path("/tmp/mlpipe-dataflow-standin"))
    # D12: run each job in the template's image (a local Docker engine, host networking),
    # passing it the variables of `env` that these prefixes name (the emulators', mlpipe's).
    containers: bool = False
    container_env_prefixes: tuple[str, ...] = (
        "STORAGE_EMULATOR_HOST",
        "PUBSUB_EMULATOR_HOST",
        "GOOGLE_CLOUD_PROJECT",
        "MLPIPE_",
        "OTEL_",
    )
    port: int = 0
    seen: list[tuple[str, str, Any]] = field(default_factory=list)
    _jobs: dict[str, Job] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> DataflowStandIn:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._server = serve(
            json_handler(self, "dataflow", ("GET", "POST", "PUT")), self.port, "dataflow"
        )
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            self._kill(job)
        close(self._server)
        self._server = None

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def wait(self, timeout: float) -> None:
        for job in self.jobs():
            if job.process is not None:
                job.process.wait(timeout)

    # --- requests ----------------------------------------------------------------------------
    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, bytes]:
        body = json.loads(raw) if raw else {}
        route = urlsplit(path).path
        self.seen.append((method, route, body))
        try:
            if method == "POST" and (m := LAUNCH.match(route)):
                return 200, dumps(self._launch(m["project"], m["location"], body))
            if m := JOB.match(route):
                job = self._job(m["project"], m["location"], m["job"])
                if method == "GET":
                    return 200, dumps(job.resource())
                if method == "PUT":
                    return 200, dumps(self._update(job, body))
            raise ApiError("NOT_FOUND", f"no method {method} {route} here")
        except ApiError as exc:
            return exc.http_status, dumps(exc.body())

    def _launch(self, project: str, location: str, body: dict[str, Any]) -> dict[str, Any]:
        if project != self.project:
            raise ApiError("PERMISSION_DENIED", f"project {project} is not {self.project}")
        params = body.get("launchParameter") or {}
        name = str(params.get("jobName", ""))
        if not JOB_NAME.match(name):  # D2
            raise ApiError(
                "INVALID_ARGUMENT",
                f"job name {name!r} must match [a-z]([-a-z0-9]{{0,1022}}[a-z0-9])?",
            )
        environment = params.get("environment") or {}
        self._check_environment(environment)  # D6
        template = self._template(str(params.get("containerSpecGcsPath", "")))  # D4
        parameters = {str(k): str(v) for k, v in (params.get("parameters") or {}).items()}
        declared = {p["name"] for p in (template.get("metadata") or {}).get("parameters", [])}
        unknown = sorted(set(parameters) - declared)
        if unknown:  # D5
            raise ApiError(
                "INVALID_ARGUMENT", f"parameter(s) {unknown} are not in the template's metadata"
            )
        if self.containers and not template.get("image"):  # D12
            raise ApiError("INVALID_ARGUMENT", "the template spec names no image to run")
        if body.get("validateOnly"):  # D1
            return {}
        with self._lock:
            active = next(
                (
                    j
                    for j in self._jobs.values()
                    if j.project == project
                    and j.location == location
                    and j.name == name
                    and self._state(j) not in TERMINAL
                ),
                None,
            )
            if active is not None:  # D3
                return {"job": active.resource()}
            now = timestamp()
            job = Job(
                id=f"{now[:10].replace('-', '_')}-{uuid.uuid4().int % 10**19}",
                project=project,
                location=location,
                name=name,
                parameters=parameters,
                environment=environment,
                created=now,
                image=str(template.get("image", "")),
            )
            self._jobs[job.id] = job
            self._run(job)
        return {"job": job.resource()}

    @staticmethod
    def _check_environment(environment: dict[str, Any]) -> None:
        workers = environment.get("maxWorkers")
        if workers is not None and not 1 <= int(workers) <= 1000:
            raise ApiError("INVALID_ARGUMENT", f"maxWorkers {workers} is not from 1 to 1000")
        for key in ("tempLocation", "stagingLocation"):
            value = environment.get(key)
            if value and not str(value).startswith("gs://"):
                raise ApiError("INVALID_ARGUMENT", f"{key} {value!r} must begin with gs://")
        # D13: additionalUserLabels follow Google's label rules.
        check_labels(environment.get("additionalUserLabels"), "environment.additionalUserLabels")

    def _template(self, path: str) -> dict[str, Any]:
        if not path.startswith("gs://"):
            raise ApiError("INVALID_ARGUMENT", f"containerSpecGcsPath {path!r} is not gs://")
        bucket, _, name = path.removeprefix("gs://").partition("/")
        client = storage.Client(project=self.project)
        try:
            data = client.bucket(bucket).blob(name).download_as_bytes()
        except Exception as exc:
            raise ApiError(
                "INVALID_ARGUMENT", f"cannot read the template spec {path}: {exc}"
            ) from None
        return dict(json.loads(data))

    def _run(self, job: Job) -> None:
        # D10: the template's pipeline as a local process; D12: in the template's image.
        args = [f"--{k}={v}" for k, v in job.parameters.items()]
        log_path = self.log_dir / f"{job.id}.log"
        job.log_path = str(log_path)
        command = self._in_image(job) if self.containers else self.command
        with log_path.open("ab") as out:
            job.process = subprocess.Popen(
                [*command, *args, *self.runner_args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        job.state, job.state_time = "JOB_STATE_RUNNING", timestamp()

    def _in_image(self, job: Job) -> list[str]:
        """`docker run` of the template's image through its Flex Template launcher."""
        job.container = f"mlpipe-dataflow-{job.id.replace('_', '-')}"
        env = self.env if self.env is not None else dict(os.environ)
        passed = sorted(k for k in env if k.startswith(self.container_env_prefixes))
        return [
            "docker",
            "run",
            "--rm",
            "--network=host",
            f"--name={job.container}",
            *(f"--env={k}={env[k]}" for k in passed),
            f"--entrypoint={TEMPLATE_LAUNCHER}",
            job.image,
        ]

    def _kill(self, job: Job) -> None:
        """Stop the job's process, and its container when it runs in one (the `docker run`
        client's end does not stop the container)."""
        if job.container:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    ["docker", "rm", "--force", job.container],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
        if job.process is not None and job.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                job.process.kill()
            job.process.wait(10)

    def _state(self, job: Job) -> str:
        if job.state in TERMINAL or job.process is None:
            return job.state
        code = job.process.poll()
        if code is not None:
            job.state = "JOB_STATE_DONE" if code == 0 else "JOB_STATE_FAILED"
            job.state_time = timestamp()
        return job.state

    def _job(self, project: str, location: str, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.project != project or job.location != location:
            raise ApiError("NOT_FOUND", f"job {job_id} not found in {project}/{location}")
        self._state(job)
        return job

    def _update(self, job: Job, body: dict[str, Any]) -> dict[str, Any]:
        requested = body.get("requestedState")
        if isinstance(requested, int) and 0 <= requested < len(JOB_STATES):  # D11
            requested = JOB_STATES[requested]
        if requested != "JOB_STATE_CANCELLED":  # D9: only cancelling is served here
            raise ApiError("UNIMPLEMENTED", f"requestedState {requested!r} is not served here")
        if self._state(job) in TERMINAL:  # D8
            raise ApiError("FAILED_PRECONDITION", f"job {job.id} is in terminal state {job.state}")
        self._kill(job)
        job.state, job.state_time = "JOB_STATE_CANCELLED", timestamp()
        return job.resource()


def template_spec(image: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """A Flex Template spec file (what `gcloud dataflow flex-template build` writes from an
    image and a metadata file, jobs/batch/metadata.json here): image, SDK language, metadata."""
    return {"image": image, "sdkInfo": {"language": "PYTHON"}, "metadata": metadata}
