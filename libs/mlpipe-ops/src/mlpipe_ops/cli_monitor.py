"""`mlpipe monitor`: drift checks of a pipeline's served champion on the local stack."""

from __future__ import annotations

import uuid
import webbrowser
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from mlpipe.store import layout
from mlpipe_ops.cli_runs import DEFAULT_STATE_DIR, StateDir, _storage, running_stack

monitor_app = typer.Typer(help="Drift checks: served inputs against the champion's training data.")


def _row(feature: dict[str, Any]) -> str:
    ks = feature.get("ks_statistic")
    ks_text = f"KS {ks:.3f} (p {feature['ks_pvalue']:.2g})" if ks is not None else ""
    verdict = "DRIFT " if feature["drifted"] else "stable"
    return f"  {verdict} {feature['name']:<22} PSI {feature['psi']:7.3f}  {ks_text}"


@monitor_app.command("check")
def check(
    pipeline: str,
    window_hours: Annotated[
        float, typer.Option(help="Served inputs this recent (0: the pipeline's setting).")
    ] = 0.0,
    out: Annotated[Path | None, typer.Option(help="Where to save drift.html.")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the report.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Write the predictor's buffered log, run the check, print the verdict and the report."""
    state = running_stack(state_dir)
    try:
        httpx.post(f"{state.url('predictor')}/v1/monitoring:flush", timeout=30).raise_for_status()
    except httpx.HTTPError as exc:
        typer.secho(f"predictor log not flushed ({exc}); checking what is stored", err=True)
    check_id = f"cli-{uuid.uuid4().hex[:12]}"
    reply = httpx.post(
        f"{state.url('evaluator')}/v1/monitoring/{pipeline}:check",
        params={"window_hours": window_hours},
        headers={"x-mlpipe-request-id": check_id},
        timeout=300,
    )
    body = reply.json()
    if reply.status_code != 200:
        typer.secho(body.get("error", {}).get("message", reply.text), fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(
        f"{body['model']} v{body['version']}: {body['verdict']} "
        f"({body['served_samples']} served rows in {body['window_hours']:g} h, "
        f"{body['reference_rows']} training rows)"
    )
    for feature in body.get("features", []):
        typer.echo(_row(feature))
    if body.get("prediction"):
        typer.echo(_row(body["prediction"]))
    if body.get("retrain_note"):
        retrain = body.get("retrain_request_id") or "none"
        typer.echo(f"retrain: {retrain} ({body['retrain_note']})")
    report_path = layout.DriftCheckPaths(body["model"], body["check_id"]).page
    with _storage(state_dir) as storage:
        page = storage.read(report_path)
    if page is not None:
        target = out or state_dir / "reports" / f"drift-{body['check_id']}.html"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(page.data)
        typer.echo(f"report: {target.resolve()} (from {page.uri})")
        if open_browser:
            webbrowser.open(target.resolve().as_uri())
    if body["status"] == "drift":
        raise typer.Exit(3)  # scripts can tell drift from a clean check
