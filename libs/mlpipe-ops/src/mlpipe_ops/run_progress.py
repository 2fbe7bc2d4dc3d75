"""Printing a run's progress as its events arrive (`mlpipe run`, `mlpipe schedule run`).

`follow_run` prints each hop of the chain, ingest to the served model; with `scoring`, it then
follows the new champion's scoring of the next days (mlpipe_predictor.champion_scoring) to its
BatchPredictionCompleted and prints the predictions' URIs and row count.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import typer

from mlpipe.messaging import events
from mlpipe.store import layout
from mlpipe.store.layout import RunPaths
from mlpipe.store.registry import CHAMPION
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.follow import PROGRESS_TOPICS, EventWatcher, Observed
from mlpipe_ops.localstack import StackState

# What `follow_run(..., scoring=True)` needs to see besides the chain's events.
SCORING_TOPICS = (
    *PROGRESS_TOPICS,
    events.BATCH_PREDICTION_REQUESTS,
    events.BATCH_PREDICTIONS_COMPLETED,
)


def stamp(t0: float) -> str:
    return f"[{time.monotonic() - t0:6.2f}s]"


def _storage(state: StackState) -> Storage:
    return Storage(make_client(state.project), state.bucket)


def print_gates(evaluation: events_pb2.EvaluationCompleted) -> None:
    for gate in evaluation.gates:
        mark = (
            typer.style("pass", fg=typer.colors.GREEN)
            if gate.passed
            else typer.style("FAIL", fg=typer.colors.RED)
        )
        typer.echo(
            f"{'':10}{mark}  {gate.name:<32} {gate.value:8.4f} "
            f"{events.gate_comparison(gate)} {gate.threshold:g}"
        )


def wait_serving(state: StackState, model: str, version: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            served = httpx.get(f"{state.url('predictor')}/v1/models", timeout=2).json()
            if served["models"].get(model, {}).get("version") == version:
                return True
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    return False


def is_full_champion(deployment: events_pb2.DeploymentCompleted) -> bool:
    """The deployments that start a champion's scoring (as mlpipe_predictor.champion_scoring)."""
    return (
        deployment.deployed
        and events.model_alias(deployment) == CHAMPION
        and events.rollout_action(deployment) == "promote"
    )


def print_scored(t0: float, done: events_pb2.BatchPredictionCompleted) -> None:
    typer.secho(
        f"{stamp(t0)} batch      {done.model_name} v{done.model_version} scored "
        f"{done.scored_rows} of {done.rows} rows (batch {done.batch_id}, {done.runner})",
        fg=typer.colors.GREEN,
    )
    for uri in done.output_uris:
        typer.echo(f"{'':10} predictions {uri}")
    if done.metrics_uri:
        typer.echo(f"{'':10} metrics     {done.metrics_uri}")


def _recorded_scoring(
    state: StackState, deployment: events_pb2.DeploymentCompleted, t0: float
) -> bool:
    """Print the recorded scoring of a run that had already finished; False if it has none."""
    storage = _storage(state)
    model = deployment.model_name
    prefix = layout.scoring_request_path(model, f"scoring-v{deployment.version}-")
    for path in storage.list(prefix.removesuffix(".json")):
        batch_id = path.rsplit("/", 1)[-1].removesuffix(".json")
        found = storage.read(layout.batch_completed_path(model, batch_id))
        if found is not None:
            print_scored(t0, events.from_json(events_pb2.BatchPredictionCompleted, found.data))
            return True
    return False


def follow_run(
    state: StackState,
    watcher: EventWatcher,
    request_id: str,
    t0: float,
    timeout: float,
    *,
    scoring: bool = False,
) -> int:
    """Print the run's progress; return 0 when its model serves (with `scoring`: when a new
    champion's scoring batch is done, or there is none to wait for), 1 on failure, 2 on
    timeout. With `scoring`, `watcher` must watch SCORING_TOPICS."""
    run_id = ""
    deadline = time.monotonic() + timeout
    waiting_for_batch = False
    # Topics are not ordered with each other: the batch may be heard of before the deployment.
    early: events_pb2.BatchPredictionCompleted | None = None
    while time.monotonic() < deadline:
        observed: Observed | None = next(iter(watcher.events(min(1.0, timeout))), None)
        if observed is None:
            continue
        event: Any = observed.event
        ctx = event.context
        if not (ctx.request_id == request_id or (run_id and ctx.run_id == run_id)):
            continue
        now = stamp(t0)
        if isinstance(event, events_pb2.DatasetLanded):
            run_id = ctx.run_id
            note = " (identical content already landed)" if event.already_present else ""
            typer.echo(
                f"{now} ingest     landed {event.dataset.uri} "
                f"({event.dataset.row_count} rows){note}"
            )
            typer.echo(f"{'':10} run {run_id}  dataset sha256 {event.dataset.sha256[:16]}…")
            if event.already_present:
                done = _storage(state).read(RunPaths(run_id).deployment)
                if done is not None:
                    event = events.from_json(events_pb2.DeploymentCompleted, done.data)
                    typer.echo(
                        f"{'':10} this run already finished: {event.model_name} "
                        f"v{event.version} ({'deployed' if event.deployed else 'not deployed'})"
                    )
                    if scoring and event.deployed and not _recorded_scoring(state, event, t0):
                        typer.echo(f"{'':10} no scoring of v{event.version} is recorded")
                    return 0 if event.deployed else 1
        elif isinstance(event, events_pb2.TrainingStarted):
            typer.echo(
                f"{now} trainer    started {events.training_backend(event)} job {event.job_id}"
            )
        elif isinstance(event, events_pb2.TrainingCompleted):
            typer.echo(
                f"{now} training   {event.estimator.rsplit('.', 1)[-1]} fitted on "
                f"{event.train_rows} rows in {event.fit_seconds:.2f}s "
                f"(holdout {event.holdout_rows})"
            )
        elif isinstance(event, events_pb2.EvaluationCompleted):
            verdict = "passed" if event.passed else "FAILED"
            typer.echo(f"{now} evaluator  quality gates {verdict}")
            print_gates(event)
        elif isinstance(event, events_pb2.DeploymentCompleted):
            if not event.deployed:
                typer.echo(f"{now} deployer   not deployed: {event.reason}")
                if scoring:
                    typer.echo(f"{'':10} no scoring: the model is not the champion")
                return 1
            was = f"v{event.previous_version}" if event.previous_version else "none"
            typer.echo(
                f"{now} deployer   {event.model_name} v{event.version} is "
                f"{events.model_alias(event)} (was {was})"
            )
            if not wait_serving(state, event.model_name, event.version):
                typer.echo(f"{stamp(t0)} predictor  did not report v{event.version} within 30s")
                return 1
            typer.secho(
                f"{stamp(t0)} predictor  serving {event.model_name} "
                f"v{event.version} at {state.url('predictor')}/predict",
                fg=typer.colors.GREEN,
            )
            if not scoring:
                return 0
            if not is_full_champion(event):
                typer.echo(f"{'':10} no scoring: v{event.version} is not a full champion yet")
                return 0
            if early is not None:
                print_scored(t0, early)
                return 0
            waiting_for_batch = True
        elif isinstance(event, events_pb2.BatchPredictionRequest) and scoring:
            typer.echo(
                f"{now} predictor  requested batch {event.batch_id} of {event.model_name} "
                f"v{event.version}: {event.input_uri}"
            )
        elif isinstance(event, events_pb2.BatchPredictionCompleted) and scoring:
            if not waiting_for_batch:
                early = event
                continue
            print_scored(t0, event)
            return 0
        elif isinstance(event, events_pb2.PipelineFailed):
            typer.secho(
                f"{now} FAILED at {events.pipeline_stage(event)}: {event.reason}: {event.message}",
                fg=typer.colors.RED,
            )
            if event.quarantine_uri:
                typer.echo(f"{'':10} input kept at {event.quarantine_uri}")
            return 1
    typer.secho(
        f"no final event within {timeout:.0f}s; see `mlpipe status` and the logs in "
        f"{state.state_dir}/logs",
        fg=typer.colors.YELLOW,
    )
    return 2
