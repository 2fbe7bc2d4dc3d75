"""Permanent failures: keep the input whole under `quarantine/`, publish PipelineFailed.

A reporter without a publisher keeps and logs its failures but publishes nothing: the
notifier's, which reads pipeline-failures itself, so a failure it published would come back to
it (and a broken channel would answer every notice with another).
"""

from __future__ import annotations

import logging
import re

from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage
from mlpipe.store import layout
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]", "_", part)[:120] or "unknown"


class FailureReporter:
    def __init__(
        self, storage: Storage, publisher: Publisher | None, *, stage: str, code_version: str
    ) -> None:
        self.storage = storage
        self.publisher = publisher
        # A stage outside PipelineStage is a bug: say so at start-up, not at the first failure.
        self.stage_value = events.PIPELINE_STAGE.of(stage)
        self.stage = stage
        self.code_version = code_version

    def quarantine(
        self, reason: str, payload: bytes, *, key: str = "", metadata: dict[str, str] | None = None
    ) -> str:
        """Store `payload` at `quarantine/<reason>/<key>` (idempotent); return its URI."""
        key = _safe(key or sha256_hex(payload)[:32])
        path = layout.quarantine_path(_safe(reason), _safe(self.stage), key)
        meta = {"stage": self.stage, "reason": reason, **(metadata or {})}
        self.storage.create_if_absent(
            path, payload, content_type="application/octet-stream", metadata=meta
        )
        return self.storage.uri(path)

    def report(
        self,
        *,
        reason: str,
        message: str,
        payload: bytes | None = None,
        source: PushMessage | None = None,
        context: events_pb2.RunContext | None = None,
        dataset: events_pb2.DatasetRef | None = None,
        quarantine_uri: str = "",
    ) -> events_pb2.PipelineFailed:
        """Quarantine the payload (when given) and publish a PipelineFailed event (built and
        returned, not published, by a reporter without a publisher)."""
        if payload is not None and not quarantine_uri:
            key = source.message_id if source and source.message_id else ""
            quarantine_uri = self.quarantine(
                reason,
                payload,
                key=key,
                metadata={
                    "message": message[:1000],
                    "subscription": source.subscription if source else "",
                },
            )
        ctx = events_pb2.RunContext()
        if context is not None:
            ctx.CopyFrom(context)
        if not ctx.request_id and source is not None:
            ctx.request_id = source.attributes.get("request_id", "")
        ctx.producer = self.stage
        ctx.code_version = self.code_version
        ctx.event_time.CopyFrom(events.timestamp())
        failed = events_pb2.PipelineFailed(
            context=ctx,
            pipeline_stage=self.stage_value,
            reason=reason,
            message=message,
            quarantine_uri=quarantine_uri,
            source_message_id=source.message_id if source else "",
            source_subscription=source.subscription if source else "",
        )
        if dataset is not None:
            failed.dataset.CopyFrom(dataset)
        if self.publisher is not None:
            self.publisher.publish(failed)
        log.warning(
            "pipeline failure at %s: %s: %s (input kept at %s%s)",
            self.stage,
            reason,
            message,
            quarantine_uri or "-",
            "" if self.publisher is not None else "; not published",
            extra={"reason": reason, "quarantine_uri": quarantine_uri},
        )
        return failed
