"""The two kinds of failure every step can raise; push handling maps them to HTTP statuses."""

from __future__ import annotations

from typing import Any


class PermanentError(Exception):
    """The input can never succeed: acknowledge it, quarantine it, publish PipelineFailed.

    `context` and `dataset` (RunContext / DatasetRef) go into the event when known.
    """

    def __init__(
        self, reason: str, message: str, *, context: Any = None, dataset: Any = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.context = context
        self.dataset = dataset


class TransientError(Exception):
    """Worth retrying later (a dependency is down, a claim is held): answer 5xx."""


class Held(TransientError):
    """Not a failure: the message started work that is still under way (a training job, a
    batch job). It is answered 503 and stays unacknowledged until that work is recorded, so
    that work lost with its instance is started again by the redelivery."""
