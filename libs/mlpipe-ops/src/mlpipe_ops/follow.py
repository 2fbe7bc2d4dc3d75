"""Following a run's events from the outside (the CLI and the end-to-end tests).

Temporary pull subscriptions on every progress topic are created *before* the request is
published, so no event of the run can be missed; they are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import queue
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.protobuf.message import Message

from mlpipe.messaging import events

PROGRESS_TOPICS = (
    events.DATASETS_LANDED,
    events.TRAINING_STARTED,
    events.TRAINING_COMPLETED,
    events.EVALUATION_COMPLETED,
    events.DEPLOYMENT_COMPLETED,
    events.PIPELINE_FAILURES,
)


@dataclass(frozen=True)
class Observed:
    topic: str
    event: Message
    message_id: str


class EventWatcher:
    def __init__(self, project: str, topics: tuple[str, ...] = PROGRESS_TOPICS) -> None:
        self.project = project
        self.topics = topics
        self.subscriber = pubsub_v1.SubscriberClient()
        self.suffix = uuid.uuid4().hex[:8]
        self.queue: queue.Queue[Observed] = queue.Queue()
        self._futures: list[pubsub_v1.subscriber.futures.StreamingPullFuture] = []
        self._subs: list[str] = []

    def __enter__(self) -> EventWatcher:
        for topic in self.topics:
            name = self.subscriber.subscription_path(self.project, f"watch-{topic}-{self.suffix}")
            self.subscriber.create_subscription(
                request={
                    "name": name,
                    "topic": f"projects/{self.project}/topics/{topic}",
                    "ack_deadline_seconds": 30,
                }
            )
            self._subs.append(name)
            self._futures.append(self.subscriber.subscribe(name, self._callback(topic)))
        return self

    def _callback(self, topic: str):  # type: ignore[no-untyped-def]
        def receive(message: pubsub_v1.subscriber.message.Message) -> None:
            event_type = message.attributes.get(events.EVENT_TYPE_ATTR, "")
            cls = events.EVENT_TYPES.get(event_type)
            if cls is not None:
                try:
                    event = events.decode(cls, message.data)
                except events.EventDecodeError:
                    event = None
                if event is not None:
                    self.queue.put(Observed(topic, event, message.message_id))
            message.ack()

        return receive

    def __exit__(self, *exc: object) -> None:
        for future in self._futures:
            future.cancel()
            with contextlib.suppress(Exception):
                future.result(timeout=5)
        for name in self._subs:
            with contextlib.suppress(gexc.GoogleAPICallError):
                self.subscriber.delete_subscription(request={"subscription": name})
        self.subscriber.close()

    def events(self, timeout: float) -> Iterator[Observed]:
        """Yield events as they arrive until `timeout` seconds pass with none."""
        while True:
            try:
                yield self.queue.get(timeout=timeout)
            except queue.Empty:
                return
