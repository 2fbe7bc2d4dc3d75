"""trainer service: a dataset's OBJECT_FINALIZE notification → a training job for its run."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from mlpipe.runtime.clients import Clients
from mlpipe.runtime.service import create_app
from mlpipe.runtime.settings import load_settings
from mlpipe_trainer.launcher import LocalJobLauncher
from mlpipe_trainer.memory import MemoryBudget
from mlpipe_trainer.recovery import crash_reporter
from mlpipe_trainer.settings import TrainerSettings
from mlpipe_trainer.start import JobLauncher, Reconciler, TrainingStarter
from mlpipe_trainer.vertex import VertexJobLauncher, VertexTarget


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(TrainerSettings)
    clients = Clients.create(settings, stage="trainer")
    memory = MemoryBudget(settings.memory_limit_bytes)
    local = LocalJobLauncher(
        settings.job_log_dir,
        crash_reporter(
            clients,
            settings.training_max_crashes,
            memory,
            restart=lambda: app.state.step.reconcile(),
        ),
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
            settings.vertex_service_account,
            settings.vertex_api_endpoint,
            settings.vertex_api_transport,
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
    timer = Reconciler(app.state.step, settings.reconcile_interval_seconds)
    timer.start()
    yield
    timer.stop()
    await asyncio.to_thread(local.terminate_all, settings.shutdown_job_grace_seconds)


app = create_app("trainer", lifespan)


@app.post("/v1/runs:reconcile")
async def reconcile_runs(request: Request) -> dict[str, object]:
    """Start again every started run whose job is gone (Cloud Scheduler calls this)."""
    starter: TrainingStarter = request.app.state.step
    results = await run_in_threadpool(starter.reconcile)
    return {"restarted": [{"run_id": r.run_id, "status": r.status} for r in results]}
