"""trainer service: a dataset's OBJECT_FINALIZE notification → a training job for its run."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from pydantic import Field

from mlpipe.runtime.service import Clients, create_app
from mlpipe.runtime.settings import CommonSettings, load_settings
from mlpipe_trainer.launcher import LocalJobLauncher, Runner
from mlpipe_trainer.memory import MemoryBudget
from mlpipe_trainer.recovery import crash_reporter
from mlpipe_trainer.start import JobLauncher, TrainingStarter
from mlpipe_trainer.vertex import VertexJobLauncher, VertexTarget


class TrainerSettings(CommonSettings):
    job_log_dir: Path = Path("/tmp/mlpipe-jobs")
    # A running job renews its run's claim every quarter of this; a claim not renewed for this
    # long belongs to a job that is gone, and the held notification's redelivery takes it over.
    training_lease_seconds: float = 120.0
    # A run whose job died this many times without recording a result fails (job_crashed).
    training_max_crashes: int = 3
    # On SIGTERM: how long running local jobs may take to finish before they are stopped and
    # their claims released (Cloud Run allows 10 s in all).
    shutdown_job_grace_seconds: float = 3.0
    # The image Vertex AI CustomJobs run (this service's own image); without it, pipelines
    # that ask for the vertex backend are rejected with a message naming this setting.
    trainer_image: str = ""
    # warm: jobs fork from a pre-imported server (fast start); subprocess: a fresh interpreter.
    job_runner: Runner = "warm"
    # The memory local jobs share with this server; 0: the limit of its cgroup (Cloud Run's,
    # a container's). Datasets too large for it are refused with `dataset_too_large`.
    memory_limit_bytes: int = Field(default=0, ge=0)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(TrainerSettings)
    clients = Clients.create(settings, stage="trainer")
    memory = MemoryBudget(settings.memory_limit_bytes)
    local = LocalJobLauncher(
        settings.job_log_dir,
        crash_reporter(clients, settings.training_max_crashes, memory),
        settings.job_runner,
        memory=memory,
    )
    # The forkserver imports the training stack (about 2 s) after the service is ready: the
    # port answers at once, and a job launched before the warm-up ends waits for the same
    # forkserver (multiprocessing starts it once, under a lock).
    threading.Thread(target=local.warm_up, name="forkserver-warm-up", daemon=True).start()
    launchers: dict[str, JobLauncher] = {"local": local}
    if settings.trainer_image:
        target = VertexTarget(
            settings.project,
            settings.bucket,
            settings.trainer_image,
            settings.code_version,
            settings.env,
        )
        launchers["vertex"] = VertexJobLauncher(target)
    app.state.clients = clients
    app.state.step = TrainingStarter(
        clients.storage,
        clients.publisher,
        launchers,
        settings.code_version,
        settings.training_lease_seconds,
        settings.env,
        settings.training_max_crashes,
        memory,
    )
    yield
    await asyncio.to_thread(local.terminate_all, settings.shutdown_job_grace_seconds)


app = create_app("trainer", lifespan)
