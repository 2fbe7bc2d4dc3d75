"""What the pipeline could not process, and replaying it after a fix (the CLI's `mlpipe
failures` and the console share this).

Two places hold it:
- the dead-letter topic, kept by the `dead-letters-archive` pull subscription: messages a push
  subscription gave up on after its maximum delivery attempts (Pub/Sub records the source
  subscription in the `CloudPubSubDeadLetterSource*` attributes);
- `quarantine/<reason>/` in the bucket: inputs a service rejected for good (a PipelineFailed
  event names each), kept whole; a push body there is the envelope as it was delivered.

Replaying publishes the original data and attributes to the topic the source subscription
reads, then acknowledges the dead letter, or records the replay on the quarantined object.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from google.cloud import pubsub_v1
from google.protobuf import json_format

from mlpipe.messaging import events, topology
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import EnvelopeError, parse_envelope
from mlpipe.store import layout
from mlpipe.store.storage import Storage

DEAD_LETTER_ARCHIVE = "dead-letters-archive"
SOURCE_ATTR = "CloudPubSubDeadLetterSourceSubscription"
DEAD_LETTER_ATTRS = (
    SOURCE_ATTR,
    "CloudPubSubDeadLetterSourceDeliveryCount",
    "CloudPubSubDeadLetterSourceTopicPublishTime",
    "CloudPubSubDeadLetterSourceSubscriptionProject",
)


class ReplayError(ValueError):
    """The failure cannot be replayed; the message says why and what to do instead."""


@dataclass(frozen=True)
class Failure:
    id: str  # a dead letter's message id, or the quarantined object's path
    kind: str  # "dead-letter" or "quarantine"
    source: str  # the subscription that could not process it
    reason: str
    detail: str
    size: int
    replayed: str = ""
    preview: str = ""  # the start of a dead letter's data, for a person to look at
    # A Pub/Sub message (a dead letter, a quarantined push body) can be published again; a
    # rejected upload or request cannot: it is fixed and sent again.
    replayable: bool = True


def topic_of_subscription(subscription: str) -> str:
    """The topic a push subscription of the topology reads; ReplayError for any other."""
    name = subscription.rsplit("/", 1)[-1]
    for sub in topology.TOPOLOGY.push:
        if sub.name == name:
            return sub.topic
    raise ReplayError(f"{subscription!r} is not a push subscription of the topology")


def _pull_all(
    subscriber: pubsub_v1.SubscriberClient, subscription: str, limit: int
) -> list[pubsub_v1.types.ReceivedMessage]:
    received: list[pubsub_v1.types.ReceivedMessage] = []
    while len(received) < limit:
        reply = subscriber.pull(
            request={
                "subscription": subscription,
                "max_messages": min(100, limit - len(received)),
                "return_immediately": True,
            },
            timeout=10,
        )
        if not reply.received_messages:
            break
        received.extend(reply.received_messages)
    return received


def _release(subscriber: pubsub_v1.SubscriberClient, subscription: str, ack_ids: list[str]) -> None:
    """Give pulled messages back at once (they stay in the archive)."""
    for start in range(0, len(ack_ids), 100):
        subscriber.modify_ack_deadline(
            request={
                "subscription": subscription,
                "ack_ids": ack_ids[start : start + 100],
                "ack_deadline_seconds": 0,
            }
        )


def dead_letters(project: str, limit: int = 1000) -> list[Failure]:
    subscriber = pubsub_v1.SubscriberClient()
    subscription = subscriber.subscription_path(project, DEAD_LETTER_ARCHIVE)
    try:
        received = _pull_all(subscriber, subscription, limit)
        _release(subscriber, subscription, [r.ack_id for r in received])
    finally:
        subscriber.close()
    seen: dict[str, Failure] = {}
    for r in received:
        attrs = dict(r.message.attributes)
        seen[r.message.message_id] = Failure(
            id=r.message.message_id,
            kind="dead-letter",
            source=attrs.get(SOURCE_ATTR, "?"),
            reason="max_delivery_attempts",
            detail=f"{attrs.get('CloudPubSubDeadLetterSourceDeliveryCount', '?')} delivery "
            f"attempt(s); event {attrs.get('event_type', '-')}",
            size=len(r.message.data),
            preview=readable(r.message.data, attrs),
        )
    return list(seen.values())


def quarantined(storage: Storage) -> list[Failure]:
    found = []
    for blob in storage.client.list_blobs(storage.bucket_name, prefix=layout.QUARANTINE):
        meta = dict(blob.metadata or {})
        found.append(
            Failure(
                id=blob.name,
                kind="quarantine",
                source=meta.get("subscription") or meta.get("object") or meta.get("stage", "?"),
                reason=meta.get("reason") or blob.name.split("/")[1],
                detail=meta.get("message", "")[:200],
                size=int(blob.size or 0),
                replayed=meta.get("replayed_as", ""),
                replayable=bool(meta.get("subscription")),
            )
        )
    return found


def replay_dead_letter(project: str, message_id: str, limit: int = 1000) -> str:
    """Publish the dead letter `message_id` to its source topic, then acknowledge it."""
    subscriber = pubsub_v1.SubscriberClient()
    subscription = subscriber.subscription_path(project, DEAD_LETTER_ARCHIVE)
    try:
        received = _pull_all(subscriber, subscription, limit)
        match = [r for r in received if r.message.message_id == message_id]
        others = [r.ack_id for r in received if r.message.message_id != message_id]
        _release(subscriber, subscription, others)
        if not match:
            raise ReplayError(f"no dead letter with message id {message_id}")
        message = match[0].message
        try:
            topic = topic_of_subscription(message.attributes.get(SOURCE_ATTR, ""))
        except ReplayError:
            _release(subscriber, subscription, [r.ack_id for r in match])
            raise
        attributes = {k: v for k, v in message.attributes.items() if k not in DEAD_LETTER_ATTRS}
        new_id = Publisher(project).publish_raw(topic, message.data, attributes)
        subscriber.acknowledge(
            request={"subscription": subscription, "ack_ids": [r.ack_id for r in match]}
        )
        return f"{topic} message {new_id}"
    finally:
        subscriber.close()


def replay_quarantined(storage: Storage, project: str, path: str) -> str:
    """Publish a quarantined push message to its subscription's topic; note it on the object."""
    blob = storage.bucket.get_blob(path)
    if blob is None:
        raise ReplayError(f"nothing quarantined at {storage.uri(path)}")
    meta = dict(blob.metadata or {})
    if meta.get("replayed_as"):
        raise ReplayError(f"{path} was replayed already as {meta['replayed_as']}")
    if not meta.get("subscription"):
        raise ReplayError(
            f"{path} is not a Pub/Sub message ({meta.get('message', 'kept input')[:120]}); "
            f"fix the input and send it again (for an upload: copy the fixed file again)"
        )
    topic = topic_of_subscription(meta["subscription"])
    try:
        message = parse_envelope(blob.download_as_bytes(if_generation_match=blob.generation))
    except EnvelopeError as exc:
        raise ReplayError(f"{path} holds no push envelope ({exc}); it cannot be replayed") from exc
    new_id = Publisher(project).publish_raw(topic, message.data, message.attributes)
    blob.metadata = {
        **meta,
        "replayed_as": f"{topic}/{new_id}",
        "replayed_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    blob.patch(if_metageneration_match=blob.metageneration)
    return f"{topic} message {new_id}"


def preview_quarantined(storage: Storage, path: str, limit: int = 2048) -> str:
    """The first `limit` bytes of a kept input as text (a push envelope's message data decoded
    when it is one), for a person to look at; "" when nothing is kept there."""
    found = storage.read(path)
    if found is None:
        return ""
    try:
        message = parse_envelope(found.data)
    except EnvelopeError:
        return _text(found.data, limit)
    return readable(message.data, message.attributes, limit)


def readable(data: bytes, attributes: Mapping[str, str], limit: int = 2048) -> str:
    """A message's data for a person: the event as JSON when its `event_type` attribute names
    one and the data decodes as it, else the data as text."""
    cls = events.EVENT_TYPES.get(attributes.get(events.EVENT_TYPE_ATTR, ""))
    if cls is not None:
        with contextlib.suppress(events.EventDecodeError):
            encoding = attributes.get(events.SCHEMA_ENCODING_ATTR, "")
            decoded = events.decode(cls, data, encoding)
            text = json_format.MessageToJson(decoded, preserving_proto_field_name=True)
            return _text(text.encode(), limit)
    return _text(data, limit)


def _text(data: bytes, limit: int = 2048) -> str:
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("…" if len(data) > limit else "")


def replay(storage: Storage, project: str, failure_id: str) -> str:
    """Replay one failure: a `quarantine/` path or a dead letter's message id."""
    if failure_id.startswith(layout.QUARANTINE):
        return replay_quarantined(storage, project, failure_id)
    return replay_dead_letter(project, failure_id)
