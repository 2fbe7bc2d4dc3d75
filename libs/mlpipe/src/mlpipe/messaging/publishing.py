"""Typed publishing: one call sends an event, binary-encoded, to the topic of its type."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from google.cloud import pubsub_v1
from google.protobuf.message import Message

from mlpipe import tracing
from mlpipe.messaging import events

log = logging.getLogger(__name__)


class Publisher:
    """Publishes mlpipe events; waits for the server's ack so a step acks only after."""

    def __init__(
        self,
        project: str,
        client: pubsub_v1.PublisherClient | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.project = project
        # A step publishes one event and waits for its ack: send it at once rather than
        # hold it for a batch timer (1.8 ms against 8 ms p50 on the emulator).
        # With tracing on, the client library's own propagation: each publish is a span,
        # and its context travels in the message's `googclient_traceparent` attribute.
        self.client = client or pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_messages=1),
            publisher_options=pubsub_v1.types.PublisherOptions(
                enable_open_telemetry_tracing=tracing.enabled()
            ),
        )
        self.timeout = timeout

    def topic_path(self, topic: str) -> str:
        return self.client.topic_path(self.project, topic)

    def publish(
        self,
        message: Message,
        *,
        topic: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> str:
        """Publish `message` to its event topic (or `topic`); return the message id."""
        topic = topic or events.topic_for(message)
        attrs = {events.EVENT_TYPE_ATTR: message.DESCRIPTOR.full_name, "encoding": "BINARY"}
        ctx = getattr(message, "context", None)
        if ctx is not None and ctx.run_id:
            attrs["run_id"] = ctx.run_id
        if attributes:
            attrs.update(attributes)
        future = self.client.publish(self.topic_path(topic), events.encode(message), **attrs)
        message_id: str = future.result(timeout=self.timeout)
        log.info(
            "published %s to %s",
            message.DESCRIPTOR.name,
            topic,
            extra={"event_type": message.DESCRIPTOR.full_name, "message_id": message_id},
        )
        return message_id

    def publish_raw(
        self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None
    ) -> str:
        future = self.client.publish(self.topic_path(topic), data, **dict(attributes or {}))
        return str(future.result(timeout=self.timeout))
