"""`mlpipe` rollout and batch commands: promote, rollback, batch-predict.

promote and rollback ask the deployer (which owns the rollout and its target) to take the
step, with the request the console sends too (mlpipe.runtime.rollout_requests);
batch-predict asks the predictor to score a dataset in GCS, then follows the job.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from mlpipe.messaging import events
from mlpipe.runtime.rollout_requests import (
    RolloutRequestError,
    request_rollout,
    rollout_summary,
)
from mlpipe.store import run_cost
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops.localstack import StackState, client_env

__all__ = [
    "batch_predict",
    "describe_traffic",
    "promote",
    "register",
    "rollback",
    "rollout_summary",
]

DEFAULT_STATE_DIR = Path(".mlpipe")
StateDir = Annotated[
    Path, typer.Option(help="Where the local stack keeps PIDs and logs.", envvar="MLPIPE_STATE_DIR")
]


def _fail(message: str) -> typer.Exit:
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _stack(state_dir: Path) -> StackState:
    state = StackState.load(state_dir)
    if state is None or not state.running():
        raise _fail(
            f"the local stack is not running (state dir {state_dir}); start it with `mlpipe up`"
        )
    return state


def describe_traffic(registry: Registry, model: str) -> str:
    """'v1 90% champion, v2 10% canary (promoted after 50 successful predictions)'."""
    traffic = registry.traffic(model)
    shares = ", ".join(f"v{v} {p}% {alias}" for v, p, alias in traffic.shares()) or "none"
    if traffic.canary is not None and traffic.promote_after:
        shares += f" (promoted after {traffic.promote_after} successful predictions)"
    return shares


def _rollout(model: str, action: str, state_dir: Path) -> None:
    state = _stack(state_dir)
    try:
        reply = request_rollout(state.url("deployer"), model, action, requested_by="cli")
    except RolloutRequestError as exc:
        raise _fail(exc.message) from None
    typer.echo(rollout_summary(model, action, reply))


def promote(model: str, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Give a model's canary 100% of the traffic: it becomes the champion."""
    _rollout(model, "promote", state_dir)


def rollback(model: str, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Stop a model's canary, or move its champion back to the version it replaced."""
    _rollout(model, "rollback", state_dir)


def batch_predict(
    model: str,
    input_uri: Annotated[str, typer.Argument(help="gs://... (CSV or Parquet), or a local file")],
    batch_id: Annotated[str | None, typer.Option(help="Names the outputs.")] = None,
    version: Annotated[int, typer.Option(help="0: the champion.")] = 0,
    key_column: Annotated[str, typer.Option(help="Column identifying each row.")] = "",
    chunk_rows: int = 0,
    wait: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = True,
    timeout: float = 600.0,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Score a dataset with a model: predictions/<model>/dt=YYYY-MM-DD/<id>.avro + metrics."""
    state = _stack(state_dir)
    batch_id = batch_id or uuid.uuid4().hex[:16]
    if not input_uri.startswith("gs://"):
        local = Path(input_uri)
        if not local.is_file():
            raise _fail(f"{input_uri} is neither gs://... nor a local file")
        with client_env(state):
            storage = Storage(make_client(state.project), state.bucket)
            path = f"batch-inputs/{batch_id}/{local.name}"
            storage.write(path, local.read_bytes())
            input_uri = storage.uri(path)
        typer.echo(f"uploaded {local} to {input_uri}")
    request = events_pb2.BatchPredictionRequest(
        context=events.context(producer="cli", code_version=state.code_version),
        batch_id=batch_id,
        model_name=model,
        input_uri=input_uri,
        version=version,
        key_column=key_column,
        chunk_rows=chunk_rows,
    )
    base = state.url("predictor")
    reply = httpx.post(f"{base}/v1/batchPredictions", content=events.to_json(request), timeout=30)
    if reply.status_code not in (200, 202):
        raise _fail(f"batch {batch_id}: {reply.text}")
    status: dict[str, Any] = reply.json()
    typer.echo(f"batch {batch_id}: {status.get('state')}")
    deadline = time.monotonic() + timeout
    while wait and status.get("state") == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        status = httpx.get(f"{base}/v1/batchPredictions/{model}/{batch_id}", timeout=10).json()
    cost = status.pop("cost", None)
    typer.echo(json.dumps(status, indent=2))
    if cost is not None:
        for line in run_cost.batch_cost_lines(cost):
            typer.echo(line)
    if status.get("state") == "failed":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    # `mlpipe promote` is cli_promotion's: MODEL alone promotes the canary (promote, above),
    # MODEL VERSION --to ENV promotes a version into another environment.
    app.command()(rollback)
    app.command("batch-predict")(batch_predict)
