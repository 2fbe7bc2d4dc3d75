"""The trainer's settings (MLPIPE_* environment variables).

One class for the service and its training job: the job (`python -m mlpipe_trainer.job`, a
local process or a cloud job's container) reads the same variables, and of its own uses only
the common settings and `training_lease_seconds`, so the lease the service grants and the
lease the job renews can never disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from mlpipe.runtime.settings import CommonSettings

# How local jobs start: forked from a warm forkserver, or as a fresh interpreter.
Runner = Literal["warm", "subprocess"]


class TrainerSettings(CommonSettings):
    job_log_dir: Path = Path("/tmp/mlpipe-jobs")
    # A running job renews its run's claim every quarter of this; a claim not renewed for this
    # long belongs to a job that is gone, and the reconciler starts the run again.
    training_lease_seconds: float = 120.0
    # How often this process runs the reconciler itself (0: never; Cloud Scheduler calls
    # POST /v1/runs:reconcile in the cloud, where an idle instance gets no CPU).
    reconcile_interval_seconds: float = Field(default=15.0, ge=0)
    # A run whose job died this many times without recording a result fails (job_crashed).
    training_max_crashes: int = 3
    # On SIGTERM: how long running local jobs may take to finish before they are stopped and
    # their claims released (Cloud Run allows 10 s in all).
    shutdown_job_grace_seconds: float = 3.0
    # The image Vertex AI CustomJobs run (this service's own image); without it, pipelines
    # that ask for the vertex backend are rejected with a message naming this setting.
    trainer_image: str = ""
    # The account Vertex AI CustomJobs run as when the pipeline names none: the trainer's own
    # (a job without one runs as the Custom Code Service Agent, which cannot publish).
    vertex_service_account: str = ""
    # Vertex AI's API host (default <region>-aiplatform.googleapis.com over gRPC); an http://
    # URL is a local Vertex AI (mlpipe vertex-standin), reached over REST.
    vertex_api_endpoint: str = ""
    vertex_api_transport: Literal["", "grpc", "rest"] = ""
    # warm: jobs fork from a pre-imported server (fast start); subprocess: a fresh interpreter.
    job_runner: Runner = "warm"
    # The memory local jobs share with this server; 0: the limit of its cgroup (Cloud Run's,
    # a container's). Datasets too large for it are refused with `dataset_too_large`.
    memory_limit_bytes: int = Field(default=0, ge=0)
