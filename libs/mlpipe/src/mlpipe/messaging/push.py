"""Pub/Sub push envelopes: parsing and the GCS notification attributes.

A push request body looks like
`{"message": {"data": <base64>, "attributes": {...}, "messageId": "...", "publishTime": "..."},
  "subscription": "projects/P/subscriptions/S", "deliveryAttempt": N}`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

# A push body larger than this is not something Pub/Sub sends (messages are at most 10 MB,
# base64 adds a third); refuse it before parsing.
MAX_ENVELOPE_BYTES = 14 * 1024 * 1024


class EnvelopeError(ValueError):
    """The request body is not a Pub/Sub push envelope."""


@dataclass(frozen=True)
class PushMessage:
    data: bytes
    attributes: dict[str, str]
    message_id: str
    publish_time: dt.datetime
    subscription: str = ""
    delivery_attempt: int = 0
    ordering_key: str = ""
    raw: bytes = field(default=b"", repr=False)

    @property
    def subscription_name(self) -> str:
        return self.subscription.rsplit("/", 1)[-1]


def _parse_time(value: Any) -> dt.datetime:
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
    return dt.datetime.now(dt.UTC)


def _integer(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EnvelopeError(f"{name} is not an integer: {value!r}") from None


def parse_envelope(body: bytes) -> PushMessage:
    """Parse a push request body; raise EnvelopeError saying what is wrong with it."""
    if len(body) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(
            f"push body is {len(body)} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit"
        )
    try:
        envelope = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"push body is not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or not isinstance(envelope.get("message"), dict):
        raise EnvelopeError("push body has no 'message' object: not a Pub/Sub push envelope")
    message = envelope["message"]
    encoded = message.get("data", "")
    if not isinstance(encoded, str):
        raise EnvelopeError("message.data is not a base64 string")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeError(f"message.data is not valid base64: {exc}") from exc
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise EnvelopeError("message.attributes is not a map of strings")
    message_id = message.get("messageId") or message.get("message_id") or ""
    attempt = _integer(envelope.get("deliveryAttempt") or 0, "deliveryAttempt")
    return PushMessage(
        data=data,
        attributes=dict(attributes),
        message_id=str(message_id),
        publish_time=_parse_time(message.get("publishTime") or message.get("publish_time")),
        subscription=str(envelope.get("subscription") or ""),
        delivery_attempt=attempt,
        ordering_key=str(message.get("orderingKey") or ""),
        raw=body,
    )


def make_envelope(
    data: bytes,
    attributes: dict[str, str] | None = None,
    message_id: str = "1",
    subscription: str = "projects/p/subscriptions/s",
    publish_time: str = "2026-01-01T00:00:00Z",
) -> bytes:
    """Build a push body as Pub/Sub would (used by tests and by `mlpipe failures replay`)."""
    return json.dumps(
        {
            "message": {
                "data": base64.b64encode(data).decode(),
                "attributes": attributes or {},
                "messageId": message_id,
                "publishTime": publish_time,
            },
            "subscription": subscription,
        }
    ).encode()


@dataclass(frozen=True)
class ObjectNotification:
    """A Cloud Storage Pub/Sub notification (payload format JSON_API_V1)."""

    bucket: str
    name: str
    generation: int
    event_type: str
    metadata: dict[str, str]
    size: int
    content_type: str
    time_created: dt.datetime | None = None

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


def parse_object_notification(message: PushMessage) -> ObjectNotification:
    """Read the GCS notification attributes (and the object resource in the data)."""
    attrs = message.attributes
    missing = [k for k in ("bucketId", "objectId", "eventType") if not attrs.get(k)]
    if missing:
        raise EnvelopeError(f"not a Cloud Storage notification: missing attributes {missing}")
    resource: dict[str, Any] = {}
    if message.data:
        try:
            loaded = json.loads(message.data)
            resource = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            resource = {}
    generation = _integer(
        attrs.get("objectGeneration") or resource.get("generation") or 0, "objectGeneration"
    )
    metadata = resource.get("metadata") or {}
    return ObjectNotification(
        bucket=attrs["bucketId"],
        name=attrs["objectId"],
        generation=generation,
        event_type=attrs["eventType"],
        metadata={str(k): str(v) for k, v in metadata.items()}
        if isinstance(metadata, dict)
        else {},
        size=_integer(resource.get("size") or 0, "size"),
        content_type=str(resource.get("contentType") or ""),
        time_created=_parse_time(resource["timeCreated"]) if resource.get("timeCreated") else None,
    )
