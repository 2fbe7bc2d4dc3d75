"""`mlpipe failures`: what the pipeline could not process, and replaying it after a fix.

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

import datetime as dt
from dataclasses import dataclass
from typing import Annotated

import typer
from google.cloud import pubsub_v1

from mlpipe.messaging import topology
from mlpipe.messaging.publishing import Publisher
from mlpipe.messaging.push import EnvelopeError, parse_envelope
from mlpipe.store import layout
from mlpipe.store.storage import Storage, make_client
from mlpipe_ops.cli_runs import DEFAULT_STATE_DIR, StateDir, running_stack
from mlpipe_ops.localstack import StackState, client_env

DEAD_LETTER_ARCHIVE = "dead-letters-archive"
SOURCE_ATTR = "CloudPubSubDeadLetterSourceSubscription"
DEAD_LETTER_ATTRS = (
    SOURCE_ATTR,
    "CloudPubSubDeadLetterSourceDeliveryCount",
    "CloudPubSubDeadLetterSourceTopicPublishTime",
    "CloudPubSubDeadLetterSourceSubscriptionProject",
)

failures_app = typer.Typer(
    help="Dead letters and quarantined inputs: list them, replay one after a fix.",
    invoke_without_command=True,
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


def _bucket(state: StackState) -> Storage:
    return Storage(make_client(state.project), state.bucket)


@failures_app.callback()
def failures(ctx: typer.Context, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """List dead letters and quarantined inputs (with no subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    state = running_stack(state_dir)
    with client_env(state):
        letters = dead_letters(state.project)
        kept = quarantined(_bucket(state))
    typer.echo(f"dead letters ({len(letters)}) in {DEAD_LETTER_ARCHIVE}:")
    for f in letters:
        typer.echo(f"  {f.id}  from {f.source}  {f.detail}  ({f.size} bytes)")
    typer.echo(f"quarantined ({len(kept)}) under gs://{state.bucket}/{layout.QUARANTINE}:")
    for f in kept:
        note = f"  [replayed as {f.replayed}]" if f.replayed else ""
        typer.echo(f"  {f.id}  {f.reason}  from {f.source}: {f.detail}{note}")
    if letters or kept:
        typer.echo("replay one after a fix: mlpipe failures replay ID")


@failures_app.command("replay")
def replay(
    failure_id: Annotated[str, typer.Argument(help="A dead letter's id or a quarantine/ path.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Publish one failure's original message to the topic it came from."""
    state = running_stack(state_dir)
    with client_env(state):
        try:
            if failure_id.startswith(layout.QUARANTINE):
                done = replay_quarantined(_bucket(state), state.project, failure_id)
            else:
                done = replay_dead_letter(state.project, failure_id)
        except ReplayError as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
    typer.echo(f"replayed {failure_id} → {done}")
