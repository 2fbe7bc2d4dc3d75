"""evaluator service: TrainingCompleted → holdout metrics and quality gates."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mlpipe.service import Clients, create_app
from mlpipe.settings import CommonSettings, load_settings
from mlpipe_evaluator.evaluation import Evaluator


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(CommonSettings)
    clients = Clients.create(settings, stage="evaluator")
    app.state.clients = clients
    app.state.step = Evaluator(clients.storage, clients.publisher, settings.code_version)
    yield


app = create_app("evaluator", lifespan)
