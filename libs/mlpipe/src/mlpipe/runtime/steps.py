"""What a push step is: a function from a push message to a StepResult, and the helpers every
step uses to read its typed event and to re-publish an outcome it already recorded.

No web framework here: domain modules import this, never the web adapter
(mlpipe.runtime.service).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import Message

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage
from mlpipe.store import storage as gcs


@dataclass
class StepResult:
    """What a step did with a message: `status` is one word, `detail` goes into the reply."""

    status: str
    detail: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""


Step = Callable[[PushMessage], StepResult]

M = TypeVar("M", bound=Message)


def decode_message(cls: type[M], message: PushMessage) -> M:
    """The push message's payload as `cls` (binary or JSON); undecodable is permanent."""
    try:
        return events.decode(
            cls, message.data, message.attributes.get(events.SCHEMA_ENCODING_ATTR, "")
        )
    except events.EventDecodeError as exc:
        raise PermanentError("invalid_message", str(exc)) from exc


def republish_recorded(
    storage: gcs.Storage, publisher: Publisher, path: str, cls: type[Message]
) -> bool:
    """If a step already recorded its outcome at `path`, publish it again and say so.

    Each step records the event it emitted; a redelivery re-publishes that event instead of
    redoing the work, so a chain that stalled after the record resumes where it stopped.
    """
    recorded = storage.read(path)
    if recorded is None:
        return False
    publisher.publish(events.from_json(cls, recorded.data))
    return True
