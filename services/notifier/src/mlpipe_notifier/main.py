"""notifier service: PipelineFailed, EvaluationCompleted (gates not passed), DriftDetected and
DeploymentCompleted (canary milestones) → posts to team channels (docs/notifications.md)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mlpipe.runtime.clients import Clients
from mlpipe.runtime.service import create_app
from mlpipe.runtime.settings import load_settings
from mlpipe_notifier.delivery import Notifier
from mlpipe_notifier.posting import Poster
from mlpipe_notifier.settings import NotifierSettings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = load_settings(NotifierSettings)
    # Its failures are kept, never published: it reads pipeline-failures itself.
    clients = Clients.create(settings, stage="notifier", publishes_failures=False)
    app.state.clients = clients
    app.state.step = Notifier(
        clients.storage,
        settings.notify_channels,
        settings.console_url,
        Poster(settings.notify_connect_timeout_seconds, settings.notify_timeout_seconds),
        settings.notify_claim_lease_seconds,
        f"mlpipe-notifier/{settings.code_version}",
    )
    if settings.notify_channels:
        described = "; ".join(c.describe() for c in settings.notify_channels)
        log.info("notifying %d channel(s): %s", len(settings.notify_channels), described)
    else:
        log.warning(
            "no channel configured (MLPIPE_NOTIFY_CHANNELS): each notice is logged, not sent"
        )
    yield


app = create_app("notifier", lifespan)
