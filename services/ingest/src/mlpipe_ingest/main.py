"""ingest service: Pub/Sub push of IngestRequest → a dataset object in the landing bucket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mlpipe.service import Clients, create_app
from mlpipe.settings import CommonSettings, load_settings
from mlpipe_ingest.landing import Landing


class IngestSettings(CommonSettings):
    # Pub/Sub's own limit is 10 MB; larger data belongs in GCS.
    max_inline_bytes: int = 5 * 1024 * 1024


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
    )
    yield


app = create_app("ingest", lifespan)
