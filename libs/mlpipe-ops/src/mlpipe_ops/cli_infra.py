"""`mlpipe infra plan|apply --env E`: the topology in the local stack or a GCP project;
`mlpipe infra run-flags SERVICE --env E`: the `gcloud run deploy` flags of one service."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from google.api_core import exceptions as gexc
from google.auth.exceptions import DefaultCredentialsError

from mlpipe.messaging.topology import TOPOLOGY
from mlpipe_ops import infra, service_runtime
from mlpipe_ops.localstack import StackState, client_env

infra_app = typer.Typer(
    help="Provision the topology (topics, push subscriptions, dead letters, IAM, the bucket "
    "notification, schedules) from infra/environments/<env>.yaml and keep the Cloud Run "
    "services' runtime settings as infra/runtime.yaml says; render a service's deploy flags.",
    no_args_is_help=True,
)

EnvName = Annotated[
    str, typer.Option("--env", help="local, dev, staging, prod: infra/environments/<env>.yaml.")
]
Project = Annotated[str | None, typer.Option(help="Another project than the environment file's.")]
ProjectNumber = Annotated[
    int | None,
    typer.Option(help="Its number (required with --project on GCP, unless the file has it)."),
]
EnvironmentsDir = Annotated[
    Path | None,
    typer.Option(help="Where <env>.yaml files are.", envvar="MLPIPE_INFRA_DIR"),
]
StateDir = Annotated[
    Path,
    typer.Option(help="The local stack's state (env local).", envvar="MLPIPE_STATE_DIR"),
]
EMULATOR_VARIABLES = ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")


def _fail(message: str) -> typer.Exit:
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(1)


@contextlib.contextmanager
def _target(
    env: str,
    project: str | None,
    project_number: int | None,
    environments_dir: Path | None,
    state_dir: Path,
) -> Iterator[infra.Target]:
    """The resolved target, with the client libraries pointed at the right place inside."""
    try:
        environment = infra.load_environment(env, environments_dir)
        if environment.target == "gcp":
            set_vars = [v for v in EMULATOR_VARIABLES if os.environ.get(v)]
            if set_vars:
                # The client libraries would silently talk to the emulator instead.
                raise infra.InfraError(
                    f"{' and '.join(set_vars)} set: unset it to plan against the GCP project"
                )
            runtimes = service_runtime.load_runtimes(
                env, service_runtime.runtime_file(environments_dir)
            )
            yield infra.resolve(
                environment,
                env,
                project=project,
                project_number=project_number,
                runtimes=runtimes,
            )
            return
        state = StackState.load(state_dir)
        if state is None or not any(p.alive() for p in state.processes):
            raise infra.InfraError(
                f"env {env} is the local stack, which is not running (state dir {state_dir}); "
                f"start it with `mlpipe up`"
            )
        target = infra.resolve(
            environment,
            env,
            project=project or state.project,
            bucket=state.bucket,
            ports=state.service_ports,
        )
        with client_env(state):
            yield target
    except (infra.InfraError, service_runtime.RuntimeDefinitionError) as exc:
        raise _fail(str(exc)) from None
    except DefaultCredentialsError as exc:
        raise _fail(
            f"no Google credentials ({exc}); run `gcloud auth application-default login`"
        ) from None
    except gexc.GoogleAPICallError as exc:
        raise _fail(f"{type(exc).__name__}: {exc.message}") from None


@infra_app.command()
def plan(
    env: EnvName,
    project: Project = None,
    project_number: ProjectNumber = None,
    environments_dir: EnvironmentsDir = None,
    state_dir: StateDir = Path(".mlpipe"),
    detailed_exitcode: Annotated[
        bool, typer.Option(help="Exit 2 when there are changes to apply (for CI drift checks).")
    ] = False,
) -> None:
    """Show what `apply` would change; change nothing."""
    with _target(env, project, project_number, environments_dir, state_dir) as target:
        planned = infra.plan(target)
    for line in planned.lines():
        typer.echo(line)
    if detailed_exitcode and planned.pending:
        raise typer.Exit(2)


@infra_app.command()
def apply(
    env: EnvName,
    project: Project = None,
    project_number: ProjectNumber = None,
    environments_dir: EnvironmentsDir = None,
    state_dir: StateDir = Path(".mlpipe"),
) -> None:
    """Make the environment match the topology; a second run changes nothing."""
    with _target(env, project, project_number, environments_dir, state_dir) as target:
        typer.echo(target.describe())
        done = infra.apply(target, progress=lambda change: typer.echo(f"  {change}"))
    for change in done.blocked:
        typer.echo(f"  {change}")
    for note in done.notes:
        typer.echo(f"  note: {note}")
    typer.echo(done.summary(applied=True))
    if done.blocked:
        raise _fail(f"{len(done.blocked)} change(s) blocked; see above, then apply again")


@infra_app.command("run-flags")
def run_flags(
    service: Annotated[str, typer.Argument(help="ingest, trainer, evaluator, deployer, predictor")],
    env: EnvName,
    image: Annotated[str, typer.Option(help="The image to deploy (its immutable tag).")],
    code_version: Annotated[str, typer.Option(help="The git commit it was built from.")],
    project: Project = None,
    project_number: ProjectNumber = None,
    output: Annotated[
        Path | None, typer.Option(help="Write the flags here instead of to standard output.")
    ] = None,
    environments_dir: EnvironmentsDir = None,
) -> None:
    """Render the flags file of `gcloud run deploy mlpipe-SERVICE --flags-file FILE`: limits,
    scaling and CPU allocation from infra/runtime.yaml, identity, URL and environment from
    infra/environments/<env>.yaml."""
    try:
        environment = infra.load_environment(env, environments_dir)
        if environment.target != "gcp":
            raise infra.InfraError(
                f"env {env} is the local emulator stack; Cloud Run flags need a gcp environment"
            )
        if service not in TOPOLOGY.services:
            raise infra.InfraError(
                f"{service!r} is not a service (known: {', '.join(TOPOLOGY.services)})"
            )
        runtimes = service_runtime.load_runtimes(
            env, service_runtime.runtime_file(environments_dir)
        )
        target = infra.resolve(
            environment, env, project=project, project_number=project_number, runtimes=runtimes
        )
        flags = service_runtime.run_deploy_flags(
            target, service, target.runtimes[service], image=image, code_version=code_version
        )
    except (infra.InfraError, service_runtime.RuntimeDefinitionError) as exc:
        raise _fail(str(exc)) from None
    name = target.run_services[service].rsplit("/", 1)[-1]
    text = service_runtime.render_flags_file(
        flags,
        f"gcloud run deploy {name} --flags-file=FILE\n"
        f"Rendered by `mlpipe infra run-flags {service} --env {env}`\n"
        f"from infra/runtime.yaml and infra/environments/{env}.yaml.",
    )
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        typer.echo(
            f"wrote {output}: flags of {name} in {target.project} ({target.region})", err=True
        )
