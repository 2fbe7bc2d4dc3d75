"""`mlpipe failures`: what the pipeline could not process, and replaying it after a fix
(the listing and the replay live in mlpipe.messaging.kept_failures, which the console uses too).

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

from typing import Annotated

import typer

from mlpipe.messaging import kept_failures
from mlpipe.messaging.kept_failures import (
    DEAD_LETTER_ARCHIVE,
    Failure,
    ReplayError,
    dead_letters,
    quarantined,
    replay_dead_letter,
    replay_quarantined,
    topic_of_subscription,
)
from mlpipe.store import layout
from mlpipe.store.storage import Storage, make_client
from mlpipe_ops.cli_runs import DEFAULT_STATE_DIR, StateDir, running_stack
from mlpipe_ops.localstack import StackState, client_env

__all__ = [
    "DEAD_LETTER_ARCHIVE",
    "Failure",
    "ReplayError",
    "dead_letters",
    "failures_app",
    "quarantined",
    "replay_dead_letter",
    "replay_quarantined",
    "topic_of_subscription",
]

failures_app = typer.Typer(
    help="Dead letters and quarantined inputs: list them, replay one after a fix.",
    invoke_without_command=True,
)


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
            done = kept_failures.replay(_bucket(state), state.project, failure_id)
        except ReplayError as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
    typer.echo(f"replayed {failure_id} → {done}")
