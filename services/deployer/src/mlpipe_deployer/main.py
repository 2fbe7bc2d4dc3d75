"""deployer service: EvaluationCompleted → registry version + champion alias."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mlpipe.registry import Registry
from mlpipe.service import Clients, create_app
from mlpipe.settings import CommonSettings, load_settings
from mlpipe_deployer.deployment import Deployer


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(CommonSettings)
    clients = Clients.create(settings, stage="deployer")
    app.state.clients = clients
    app.state.step = Deployer(
        clients.storage, clients.publisher, Registry(clients.storage), settings.code_version
    )
    yield


app = create_app("deployer", lifespan)
