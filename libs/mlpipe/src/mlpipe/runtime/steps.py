"""The step protocol every push service follows, and the router that picks the step.

A step takes one typed event and answers a StepResult. Its outcome is a value, never an
exception: `done` (acknowledge), `held` (work is under way; ask for a redelivery), `transient`
(a dependency failed; ask for a redelivery) or `permanent` (the input can never succeed:
report it, keep the payload, acknowledge). mlpipe.runtime.service.handle_push maps them to
200 / 503 / 503 / 200.

`run_step` is the protocol itself:

    skip if recorded (re-publish the recorded outcome) → claim → run the pure step
    → record (first writer wins) → publish

so that each service writes only its pure step (event in → event out) and, where it needs
one, its claim. `Router` decodes the push message into the event type its subscription
carries (mlpipe.messaging.topology declares it) and calls that type's step.

No web framework here: domain modules import this, never the web adapter
(mlpipe.runtime.service).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from mlpipe import tracing
from mlpipe.errors import PermanentError
from mlpipe.faults import fault_point
from mlpipe.messaging import events, topology
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import PushMessage
from mlpipe.store import storage as gcs

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    DONE = "done"  # acknowledged: the work is done, a duplicate, or nothing to do
    HELD = "held"  # not acknowledged: the message's work is under way
    TRANSIENT = "transient"  # not acknowledged: retry later
    PERMANENT = "permanent"  # acknowledged once reported: the input can never succeed


@dataclass
class StepResult:
    """What a step did with a message: `status` is one word, `detail` goes into the reply."""

    status: str
    detail: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    outcome: Outcome = Outcome.DONE
    # For PERMANENT: what to report (reason, message, run context and dataset).
    failure: PermanentError | None = None


def held(detail: str, run_id: str = "") -> StepResult:
    return StepResult("held", {"detail": detail}, run_id, Outcome.HELD)


def transient(detail: str, run_id: str = "") -> StepResult:
    return StepResult("transient", {"detail": detail}, run_id, Outcome.TRANSIENT)


def permanent(failure: PermanentError, run_id: str = "") -> StepResult:
    return StepResult("rejected", {}, run_id, Outcome.PERMANENT, failure)


Step = Callable[[PushMessage], StepResult]

M = TypeVar("M", bound=Message)
E = TypeVar("E", bound=Message)
R = TypeVar("R", bound=Message)


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


def record_and_publish(
    storage: gcs.Storage,
    publisher: Publisher,
    path: str,
    event: R,
    *,
    stage: str,
    replace: bool = False,
) -> R:
    """Record `event` at `path` unless a concurrent delivery recorded first, then publish the
    recorded one; return it. The record is what makes a redelivery a duplicate, so it is
    written before the event goes out (`<stage>.before_record`, `<stage>.before_publish` are
    the fault points around it). `replace`: each attempt records its own event (a record
    that is not what makes a delivery a duplicate)."""
    fault_point(f"{stage}.before_record")
    data = events.to_json(event).encode()
    if replace:
        storage.write(path, data, content_type="application/json")
    elif storage.create_if_absent(path, data) is None:
        recorded = storage.read(path)
        if recorded is not None:
            event = events.from_json(type(event), recorded.data)
    fault_point(f"{stage}.before_publish")
    publisher.publish(event)
    return event


@dataclass(frozen=True)
class Recorded(Generic[R]):
    """Where a step records the event it emits, and that event's type."""

    path: str
    cls: type[R]


def run_step(
    *,
    storage: gcs.Storage,
    publisher: Publisher,
    stage: str,
    run_id: str,
    skip: Recorded[Message],
    work: Callable[[], R | StepResult],
    done: Callable[[R], StepResult],
    claim: Callable[[], StepResult | None] | None = None,
    record_at: str = "",
) -> StepResult:
    """The protocol: skip if recorded → claim → work → record → publish → `done(event)`.

    `skip` is the record that makes a delivery a duplicate (its event is re-published);
    the step's event is recorded there too, first writer wins, unless `record_at` names
    another place (where each attempt records its own: the trainer records the start of a
    run whose result its job records). `claim` answers None when this delivery may do the
    work, or the StepResult to answer instead (held, in progress). `work` is the pure step:
    the event to record, or a StepResult when there is nothing to record (rejected, ignored).
    A PermanentError from either is the permanent outcome, as a value.
    """
    tracing.set_run(run_id)
    try:
        if republish_recorded(storage, publisher, skip.path, skip.cls):
            return StepResult("duplicate", {"detail": "already recorded; re-published"}, run_id)
        if claim is not None and (answer := claim()) is not None:
            return answer
        with tracing.span(f"{stage} work"):
            out = work()
    except PermanentError as exc:
        return permanent(exc, run_id)
    if isinstance(out, StepResult):
        return out
    path = record_at or skip.path
    with tracing.span("record and publish", attributes={"gcs.object": path}):
        recorded = record_and_publish(
            storage, publisher, path, out, stage=stage, replace=bool(record_at)
        )
    return done(recorded)


@dataclass
class Router:
    """The step for each event type a service receives.

    The type comes from the message's `event_type` attribute (set by our publisher) or, for a
    message published without it (gcloud, Cloud Scheduler, GCS), from the subscription that
    delivered it, as mlpipe.messaging.topology declares; `default` when neither says (a
    subscription named otherwise). A type with no step is permanent. Each step gets the
    decoded event (the push message itself for a GCS notification) and the push message.
    """

    steps: Mapping[str, Callable[[Any, PushMessage], StepResult]]
    default: str = ""

    def __call__(self, message: PushMessage) -> StepResult:
        kind = (
            message.attributes.get(events.EVENT_TYPE_ATTR)
            or topology.event_of(message.subscription_name)
            or self.default
        )
        step = self.steps.get(kind)
        if step is None:
            return permanent(
                PermanentError(
                    "unexpected_event",
                    f"no step here for {kind or 'an untyped message'} "
                    f"(subscription {message.subscription_name or '-'}; "
                    f"this service takes {sorted(self.steps)})",
                )
            )
        cls = events.EVENT_TYPES.get(kind)
        try:
            event = message if cls is None else decode_message(cls, message)
        except PermanentError as exc:
            return permanent(exc)
        return step(event, message)
