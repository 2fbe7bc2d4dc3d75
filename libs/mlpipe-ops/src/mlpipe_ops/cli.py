"""The `mlpipe` command: run the local stack, drive the pipeline, look at what it did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import ConfigError, PipelineConfig, config_path, parse_config
from mlpipe.store import layout, run_cost
from mlpipe.store.layout import RunPaths
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops import cli_console, cli_promotion, cli_rollout, cli_runs, statedir
from mlpipe_ops.cli_failures import failures_app
from mlpipe_ops.cli_infra import infra_app
from mlpipe_ops.cli_monitor import monitor_app
from mlpipe_ops.cli_schedule import schedule_app
from mlpipe_ops.cli_standins import bigquery_standin, earthengine_standin, vertex_standin
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import LocalStack, StackError, StackState, client_env
from mlpipe_ops.run_progress import follow_run
from mlpipe_ops.run_progress import stamp as _stamp
from mlpipe_ops.service_runtime import (
    RuntimeDefinitionError,
    cost_sizes,
    load_prices,
    load_runtimes,
)

app = typer.Typer(
    help="mlpipe: an event-driven ML pipeline for Google Cloud.",
    no_args_is_help=True,
    add_completion=False,
)
pipeline_app = typer.Typer(help="Pipeline configs.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(infra_app, name="infra")
app.add_typer(schedule_app, name="schedule")
app.add_typer(monitor_app, name="monitor")
app.add_typer(failures_app, name="failures")
app.command("vertex-standin")(vertex_standin)
app.command("bigquery-standin")(bigquery_standin)
app.command("earthengine-standin")(earthengine_standin)

DEFAULT_STATE_DIR = Path(".mlpipe")
StateDir = Annotated[
    Path, typer.Option(help="Where the local stack keeps PIDs and logs.", envvar="MLPIPE_STATE_DIR")
]
BasePort = Annotated[
    int,
    typer.Option(
        help="First of the consecutive ports the stack uses: 10, plus 6 x N with --instances N."
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _running_stack(state_dir: Path) -> StackState:
    try:
        state = StackState.load(state_dir)
    except StackError as exc:
        raise _fail(str(exc)) from None
    if state is None or not state.running():
        if state is not None and state.containers:
            _echo_services(state)
        raise _fail(
            f"the local stack is not running (state dir {state_dir}); "
            f"start it with `mlpipe up`, or run `mlpipe demo`"
        )
    return state


def _echo_services(state: StackState) -> None:
    """Each service's process or container; a container that restarted shows its last lines."""
    if state.instance_ports:
        typer.echo(
            f"  {state.instances} instances of each service behind haproxy; each service's URL "
            f"is its load balancer's (e.g. predictor {state.url('predictor')})"
        )
    for proc in state.processes:
        where = f"  port {proc.port}" if proc.service and state.instance_ports else ""
        typer.echo(f"  {proc.name:<16} pid {proc.pid}{where}  {'up' if proc.alive() else 'DOWN'}")
    for container in state.containers:
        described = container.describe()
        typer.echo(f"  {container.service:<16} container {container.name}  {described}")
        if not described.startswith("running") or "restarted" in described:
            for line in container.logs(tail=8).splitlines():
                typer.echo(f"      {line}")


def _storage(state: StackState) -> Storage:
    return Storage(make_client(state.project), state.bucket)


def find_example(name: str) -> Path:
    for base in [Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]:
        candidate = base / "examples" / name
        if (candidate / "pipeline.yaml").exists():
            return candidate
    raise _fail(f"no example named {name!r} (looked for examples/{name}/pipeline.yaml)")


# --- stack ----------------------------------------------------------------------------------
@app.command()
def up(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    base_port: BasePort = 8680,
    foreground: Annotated[bool, typer.Option(help="Stay attached; Ctrl-C stops all.")] = False,
    containers: Annotated[
        bool,
        typer.Option(
            help="Run each service as its image (services/Dockerfile) under Cloud Run's "
            "contract and infra/runtime.yaml's limits, on the local Docker engine."
        ),
    ] = False,
    instances: Annotated[
        int,
        typer.Option(
            min=1,
            help="Run N instances of each service behind one local load balancer per service "
            "(haproxy, round robin), as Cloud Run scales a service out; 1: no balancer.",
        ),
    ] = 1,
) -> None:
    """Start the emulators, the topology and the pipeline's services on 127.0.0.1."""
    stack = LocalStack(state_dir, base_port=base_port, containers=containers, instances=instances)
    try:
        stack.up()
    except StackError as exc:
        raise _fail(str(exc)) from None
    if foreground:
        typer.echo("running; Ctrl-C stops everything")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            stack.down()
    else:
        typer.echo("stop it with `mlpipe down` (or `make down`)")


@app.command()
def down(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    wipe: Annotated[
        bool,
        typer.Option(
            "--wipe",
            help="Also delete the local data: every dataset, run, model version, alias and "
            "report (the bucket's objects), the emulator's data and the logs.",
        ),
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="With --wipe: delete without asking.")
    ] = False,
) -> None:
    """Stop every process and container `mlpipe up` started, by PID and by name. The local
    data (datasets, runs, models, reports) stays for the next `mlpipe up`, unless --wipe."""
    stack = LocalStack(state_dir)
    try:
        recorded = StackState.load(state_dir)
    except StackError as exc:
        if not wipe:
            raise _fail(str(exc)) from None
        # --wipe is the way out of a record that cannot be read: it deletes that too.
        typer.echo(str(exc))
        recorded = None
    if wipe:
        _wipe(stack, recorded, yes)
        return
    if recorded is None:
        typer.echo("nothing to stop")
    else:
        stack.down()
    if (state_dir / statedir.GCS_DIR).exists():
        typer.echo(
            f"local data kept in {state_dir / statedir.GCS_DIR} for the next `mlpipe up` "
            f"(`mlpipe down --wipe` deletes it)"
        )


def _wipe(stack: LocalStack, recorded: StackState | None, yes: bool) -> None:
    """Stop the recorded stack and delete the state directory's data (see `down`)."""
    where = stack.state_dir
    others = stack.others_using(recorded)
    if others:
        raise _fail(
            f"not wiping {where}: a stack that {where / statedir.STATE_FILE} does not record is "
            f"using it: {'; '.join(others)}. Stop it first, then run this again."
        )
    present = statedir.describe(where)
    if not present:
        if recorded is not None:
            stack.down()
        typer.echo(f"nothing to wipe in {where}")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise _fail(
                "`mlpipe down --wipe` deletes every dataset, run, model version and report of "
                "the local stack; there is no terminal to confirm on: add --yes"
            )
        summary = ", ".join(f"{name} ({statedir.human(size)})" for name, _, size in present)
        if not typer.confirm(f"Delete the local stack's data in {where}: {summary}?"):
            raise _fail("nothing deleted")
    if recorded is not None:
        stack.down()
    for name, files, size in stack.wipe():
        typer.echo(f"removed {where / name} ({files} file(s), {statedir.human(size)})")


# --- pipelines ------------------------------------------------------------------------------
def _load_config_file(path: Path) -> tuple[PipelineConfig, str]:
    """The validated config and the file's text; the estimator is built once to check it."""
    # Here, not at the top: scikit-learn takes about 3 s to import, which every command
    # (`mlpipe up` first) would pay.
    from mlpipe.ml.modeling import build_estimator

    try:
        text = path.read_text()
        config = parse_config(text, source=str(path))
    except (ConfigError, OSError) as exc:
        raise _fail(str(exc)) from None
    try:
        build_estimator(config.model)
    except PermanentError as exc:
        raise _fail(f"{path}: model: {exc.message}") from None
    return config, text


@pipeline_app.command("apply")
def pipeline_apply(file: Path, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Validate a pipeline config and register it in the bucket."""
    config, text = _load_config_file(file)
    state = _running_stack(state_dir)
    with client_env(state):
        uri = _apply_config(_storage(state), config, text)
    typer.echo(f"registered {config.name} ({config.sha256()[:12]}) at {uri}")


def _apply_config(storage: Storage, config: PipelineConfig, text: str) -> str:
    """Register the file as written, `environments` included: each environment's services
    resolve their own overrides."""
    storage.write(config_path(config.name), text.encode(), content_type="application/yaml")
    return storage.uri(config_path(config.name))


# --- running --------------------------------------------------------------------------------
def run_example(state: StackState, example: str, timeout: float) -> int:
    folder = find_example(example)
    script = folder / "run.py"
    if script.exists():
        # An example that needs more than a CSV (providers to serve, say) drives itself.
        env = {
            **os.environ,
            "MLPIPE_STATE_DIR": state.state_dir,
            "MLPIPE_RUN_TIMEOUT": f"{timeout}",
        }
        return subprocess.call([sys.executable, str(script)], env=env)
    config, text = _load_config_file(folder / "pipeline.yaml")
    csv_text = (folder / f"{example}.csv").read_text()
    with client_env(state):
        uri = _apply_config(_storage(state), config, text)
        typer.echo(f"pipeline {config.name}: config {config.sha256()[:12]} at {uri}")
        request_id = uuid.uuid4().hex
        request = events_pb2.IngestRequest(
            request_id=request_id,
            dataset=config.name,
            inline=events_pb2.InlineRows(csv=csv_text),
            requested_at=events.timestamp(),
        )
        with EventWatcher(state.project) as watcher:
            t0 = time.monotonic()
            message_id = Publisher(state.project).publish(
                request, attributes={"request_id": request_id}
            )
            typer.echo(f"{_stamp(t0)} published IngestRequest {request_id} (message {message_id})")
            return follow_run(state, watcher, request_id, t0, timeout)


@app.command()
def run(
    example: Annotated[str, typer.Option(help="Name of a folder in examples/.")] = "iris",
    timeout: float = 180.0,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Publish an example's ingest request and follow the run until its model serves."""
    state = _running_stack(state_dir)
    raise typer.Exit(run_example(state, example, timeout))


@app.command()
def demo(
    example: str = "iris",
    timeout: float = 180.0,
    base_port: BasePort = 8680,
    keep: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Start the stack, run an example end to end, ask the model for a prediction, stop."""
    stack = LocalStack(state_dir, base_port=base_port)
    previous = StackState.load(state_dir)
    was_running = bool(previous and previous.running())
    code = 1
    try:
        state = stack.up()
        code = run_example(state, example, timeout)
        folder = find_example(example)
        # An example that drives itself (run.py) may train on other columns than its CSV's.
        if code == 0 and (folder / f"{example}.csv").exists() and not (folder / "run.py").exists():
            sample = _sample_instance(example)
            reply = httpx.post(
                f"{state.url('predictor')}/predict", json={"instances": [sample]}, timeout=10
            ).json()
            typer.echo(f"predict {sample} → {reply}")
    except StackError as exc:
        raise _fail(str(exc)) from None
    finally:
        if not keep and not was_running:
            stack.down()
    raise typer.Exit(code)


def _sample_instance(example: str) -> dict[str, Any]:
    folder = find_example(example)
    config, _ = _load_config_file(folder / "pipeline.yaml")
    header, first = (folder / f"{example}.csv").read_text().splitlines()[:2]
    row = dict(zip(header.split(","), first.split(","), strict=True))
    return {
        k: float(v) if config.dataset.column_type(k) == "numeric" else v
        for k, v in row.items()
        if k in config.feature_columns(list(row))
    }


# --- looking --------------------------------------------------------------------------------
def _run_state(storage: Storage, run_id: str) -> str:
    paths = RunPaths(run_id)
    for path, label in (
        (paths.failed, "failed"),
        (paths.deployment, "decided"),
        (paths.evaluation, "evaluated"),
        (paths.training, "trained"),
        (paths.claim, "training"),
    ):
        if storage.exists(path):
            return label
    return "unknown"


def echo_run_cost(storage: Storage, run_id: str, env: str = "local") -> None:
    """The run's cost estimate (mlpipe.store.run_cost): the one recorded when it ended
    (runs/<id>/cost.json); for a run without one, computed now at infra/prices.yaml's prices,
    each step sized as infra/runtime.yaml says for `env`; or why there is none."""
    recorded = run_cost.read_record(storage, run_id)
    if recorded is not None:
        typer.echo(f"cost: {recorded.heading()}")
        if recorded.cost is None:
            typer.echo(f"cost: no estimate: {recorded.problem}")
            return
        cost = recorded.cost
    else:
        typer.echo("cost: none recorded (the run has not ended, or ended before estimates were")
        typer.echo("      recorded): computed now from its records")
        try:
            records, config, objects = run_cost.run_cost_inputs(storage, run_id)
            cost = run_cost.estimate(
                run_id, records, config, cost_sizes(load_runtimes(env)), objects, load_prices()
            )
        except (run_cost.CostInputError, RuntimeDefinitionError) as exc:
            typer.echo(f"cost: no estimate: {exc}")
            return
    for line in run_cost.cost_lines(cost):
        typer.echo(line)


@app.command()
def status(
    run_id: Annotated[str | None, typer.Argument(help="Show one run in full.")] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Runs, registry versions, champions and what the predictor serves."""
    state = _running_stack(state_dir)
    if not run_id:
        typer.echo(f"stack ({'containers' if state.containers else 'processes'}):")
        _echo_services(state)
    with client_env(state):
        storage = _storage(state)
        if run_id:
            paths = RunPaths(run_id)
            for label, path in (
                ("lineage", paths.lineage),
                ("metrics", paths.metrics),
                ("deployment", paths.deployment),
                ("failure", paths.failed),
            ):
                found = storage.read(path)
                if found is not None:
                    typer.echo(f"--- {label} ({found.uri})")
                    typer.echo(json.dumps(found.json(), indent=2))
            echo_run_cost(storage, run_id)
            return
        run_ids = layout.run_ids(storage.list(layout.RUNS))
        typer.echo(f"runs ({len(run_ids)}):")
        for rid in run_ids:
            typer.echo(f"  {rid}  {_run_state(storage, rid)}")
        registry = Registry(storage)
        for model in registry.models():
            champion = registry.alias(model, CHAMPION)
            versions = registry.versions(model)
            typer.echo(
                f"model {model}: versions {versions}, {CHAMPION} "
                f"{'v' + str(champion) if champion else '-'}"
            )
            typer.echo(f"  traffic: {cli_rollout.describe_traffic(registry, model)}")
            for v in versions:
                mv = registry.get(model, v)
                if mv is not None:
                    metrics = ", ".join(
                        f"{k}={val:.3f}"
                        for k, val in sorted(mv.info.get("metrics", {}).items())[:4]
                    )
                    typer.echo(f"  v{v}  run {mv.run_id}  {metrics}")
    try:
        served = httpx.get(f"{state.url('predictor')}/v1/models", timeout=2).json()["models"]
        typer.echo(
            "predictor serves: "
            + (
                ", ".join(
                    f"{m} v{i['version']}"
                    + (
                        f" + canary v{c['version']} {c['percent']}%"
                        if (c := i.get("canary"))
                        else ""
                    )
                    for m, i in served.items()
                )
                or "nothing yet"
            )
        )
        live = httpx.get(f"{state.url('predictor')}/v1/monitoring", timeout=2).json()
        for series, m in live["serving"].items():
            typer.echo(
                f"  {series}: {m['requests']} requests, {m['errors']} errors, "
                f"{m['instances']} instances, mean {m['mean_latency_ms']} ms"
            )
        counts = live["prediction_log"]
        typer.echo(
            f"prediction log: {counts['sampled']} sampled, {counts['written']} written, "
            f"{counts['dropped']} dropped, {counts['write_failed']} not written"
        )
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        typer.echo(f"predictor unreachable: {exc}")


@app.command()
def predict(
    instances: Annotated[str, typer.Argument(help='JSON list, e.g. "[[5.1,3.5,1.4,0.2]]"')],
    model: str | None = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Ask the local predictor for predictions."""
    state = _running_stack(state_dir)
    try:
        parsed = json.loads(instances)
    except json.JSONDecodeError as exc:
        raise _fail(f"instances are not JSON: {exc}") from None
    body: dict[str, Any] = {"instances": parsed}
    if model:
        body["model"] = model
    reply = httpx.post(f"{state.url('predictor')}/predict", json=body, timeout=10)
    typer.echo(json.dumps(reply.json(), indent=2))
    if reply.status_code != 200:
        raise typer.Exit(1)


cli_runs.register(app)
cli_rollout.register(app)
cli_promotion.register(app)
cli_console.register(app)

if __name__ == "__main__":
    app()
