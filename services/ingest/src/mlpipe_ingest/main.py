"""ingest service: Pub/Sub push of IngestRequest → a dataset object in the landing bucket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mlpipe.runtime.clients import Clients
from mlpipe.runtime.service import create_app
from mlpipe.runtime.settings import load_settings
from mlpipe_ingest.landing import Landing
from mlpipe_ingest.settings import IngestSettings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(IngestSettings)
    clients = Clients.create(settings, stage="ingest")
    app.state.clients = clients
    app.state.step = Landing(
        clients.storage,
        clients.publisher,
        settings.code_version,
        settings.max_inline_bytes,
        settings.env,
        settings.source_settings(),
    )
    yield


app = create_app("ingest", lifespan)
