"""The clients every mlpipe process builds from its settings: storage, publishing, failure
reports and, for a push service, the push verifier.

No web framework here: the training job and other non-HTTP entry points build the same
clients as the services do.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlpipe.messaging.publishing import Publisher
from mlpipe.runtime.auth import PushVerifier, push_verifier
from mlpipe.runtime.failures import FailureReporter
from mlpipe.runtime.settings import CommonSettings
from mlpipe.store import storage as gcs


@dataclass
class Clients:
    settings: CommonSettings
    storage: gcs.Storage
    publisher: Publisher
    failures: FailureReporter
    push_verifier: PushVerifier | None = None

    @classmethod
    def create(
        cls,
        settings: CommonSettings,
        stage: str,
        receives_push: bool = True,
        publishes_failures: bool = True,
    ) -> Clients:
        """`publishes_failures=False`: permanent failures are kept and logged, never published
        (mlpipe.runtime.failures: the notifier's, which reads pipeline-failures)."""
        # First: a service that would accept unauthenticated pushes must not start at all.
        verifier = push_verifier(settings) if receives_push else None
        storage = gcs.Storage(gcs.make_client(settings.project), settings.bucket)
        publisher = Publisher(settings.project, timeout=settings.publish_timeout_seconds)
        failures = FailureReporter(
            storage,
            publisher if publishes_failures else None,
            stage=stage,
            code_version=settings.code_version,
        )
        return cls(settings, storage, publisher, failures, verifier)
