"""`mlpipe` commands to look at runs, reports, versions and lineage."""

from __future__ import annotations

import json
import time
import webbrowser
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from mlpipe import tracing
from mlpipe.store import layout
from mlpipe.store.layout import RunPaths
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.store.run_records import run_outcome, run_timeline
from mlpipe.store.storage import Storage, make_client
from mlpipe_ops import statedir
from mlpipe_ops.localstack import StackState, client_env

DEFAULT_STATE_DIR = Path(".mlpipe")
StateDir = Annotated[
    Path, typer.Option(help="Where the local stack keeps PIDs and logs.", envvar="MLPIPE_STATE_DIR")
]


def running_stack(state_dir: Path) -> StackState:
    """The local stack's state, or exit 1 saying how to start it."""
    state = StackState.load(state_dir)
    if state is None:
        typer.secho(
            f"the local stack is not running (state dir {state_dir}); start it with `mlpipe up`",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    return state


@contextmanager
def _storage(state_dir: Path) -> Iterator[Storage]:
    """The local stack's bucket, with the client pointed at its emulator inside the block."""
    state = running_stack(state_dir)
    with client_env(state):
        yield Storage(make_client(state.project), state.bucket)


def runs(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """List runs with their outcome."""
    with _storage(state_dir) as storage:
        run_ids = layout.run_ids(storage.list(layout.RUNS))
        rows = [run_outcome(storage, run_id) for run_id in run_ids]
    for row in rows:
        run_id = row["run_id"]
        typer.echo(f"{run_id}  {row['pipeline']:<12} {row['state']:<13} {row.get('detail', '')}")
    if not run_ids:
        typer.echo("no runs yet")


REPORT_WAIT_SECONDS = 30.0


def report(
    run_id: str,
    out: Annotated[Path | None, typer.Option(help="Where to save the HTML report.")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open it in a browser.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Save a run's HTML report locally (and open it); print its gates and metrics."""
    paths = RunPaths(run_id)
    with _storage(state_dir) as storage:
        page = storage.read(paths.report)
        # The evaluator draws the report after publishing its verdict: wait while it is due.
        deadline = time.monotonic() + REPORT_WAIT_SECONDS
        while (
            page is None
            and time.monotonic() < deadline
            and storage.exists(layout.pending_report_path(run_id))
        ):
            time.sleep(0.2)
            page = storage.read(paths.report)
        metrics = storage.read_json(paths.metrics)
    if page is None or metrics is None:
        typer.secho(
            f"run {run_id} has no report (not evaluated yet, or failed: see "
            f"`mlpipe status {run_id}`)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    target = out or state_dir / "reports" / f"{run_id}.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(page.data)
    typer.echo(f"run {run_id}: gates {'passed' if metrics['passed'] else 'FAILED'}")
    for gate in metrics["gates"]:
        verdict = "pass" if gate.get("passed") else "FAIL"
        if str(gate.get("note", "")).startswith("not applied"):
            verdict = "skip"
        typer.echo(
            f"  {verdict}  {gate['name']:<32} {gate.get('value', 0):.4f} "
            f"{gate.get('comparison', '')} {gate.get('threshold', 0):.4g}  "
            f"{gate.get('note', '')}"
        )
    typer.echo(f"report: {target.resolve()} (from {page.uri})")
    if open_browser:
        webbrowser.open(target.resolve().as_uri())


def versions(model: str, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """A model's registered versions, with the champion marked."""
    with _storage(state_dir) as storage:
        registry = Registry(storage)
        champion = registry.alias(model, CHAMPION)
        found = [mv for v in registry.versions(model) if (mv := registry.get(model, v))]
    if not found:
        typer.echo(f"no versions of {model}")
    for mv in found:
        version = mv.version
        mark = f" ← {CHAMPION}" if version == champion else ""
        metrics = mv.info.get("metrics", {})
        shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()) if "[" not in k)
        typer.echo(
            f"v{version}  run {mv.run_id}  {mv.info.get('registered_at', '')}  {shown}{mark}"
        )


def lineage(model: str, version: int, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Walk a model version back to its dataset bytes, config and commit."""
    with _storage(state_dir) as storage:
        mv = Registry(storage).get(model, version)
        record = {} if mv is None else storage.read_json(RunPaths(mv.run_id).lineage) or {}
    if mv is None:
        typer.secho(f"{model} v{version} is not registered", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    chain = {
        "model": f"{model} v{version}",
        "artifact": {"uri": mv.model_uri, "sha256": mv.model_sha256},
        "run_id": mv.run_id,
        "dataset": record.get("dataset"),
        "config": {"sha256": record.get("config_sha256"), "uri": record.get("config_uri")},
        "code_version": record.get("code_version"),
        "split": record.get("split"),
        "estimator": record.get("model", {}).get("estimator"),
        "params": record.get("model", {}).get("params"),
        "metrics": mv.info.get("metrics"),
    }
    typer.echo(json.dumps(chain, indent=2))


def print_timeline(storage: Storage, run_id: str) -> None:
    hops = run_timeline(storage, run_id)
    if not hops:
        typer.echo(f"run {run_id} has no recorded events yet")
        return
    origin = hops[0][1]
    previous = origin
    typer.echo(f"run {run_id}")
    for label, when in hops:
        typer.echo(
            f"  {when.isoformat(timespec='milliseconds')}  +{(when - origin).total_seconds():7.3f}s"
            f"  ({(when - previous).total_seconds() * 1000:7.1f} ms)  {label}"
        )
        previous = when


def print_trace(spans: list[dict]) -> None:
    """The run's trace as a waterfall: each span under its parent, its start and duration."""
    rows = tracing.waterfall(spans)
    typer.echo(f"trace {', '.join(sorted({r['trace_id'] for r in rows}))}")
    for row in rows:
        label = "  " * row["depth"] + row["name"]
        failed = "  FAILED" if row["status"] == "ERROR" else ""
        typer.echo(
            f"  +{row['start_s']:7.3f}s  {row['duration_s'] * 1000:8.1f} ms  "
            f"{row['service']:<13} {label}{failed}"
        )


def timeline(run_id: str, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Each hop of a run, from request to deployment, with its duration: the run's trace
    (every span of every service) when the stack recorded one, else its events."""
    with _storage(state_dir) as storage:
        started = storage.read_json(RunPaths(run_id).started) or {}
        traced = [t for t in [started.get("context", {}).get("trace_id", "")] if t]
        spans = tracing.run_spans(state_dir / statedir.TRACES_DIR, run_id, traced)
        if spans:
            typer.echo(f"run {run_id}")
            print_trace(spans)
            return
        print_timeline(storage, run_id)


def register(app: typer.Typer) -> None:
    for command in (runs, report, versions, lineage, timeline):
        app.command()(command)
