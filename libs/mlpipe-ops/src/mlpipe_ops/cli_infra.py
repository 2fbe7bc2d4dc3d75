"""`mlpipe infra plan|apply --env E`: the topology in the local stack or a GCP project;
`mlpipe infra run-flags SERVICE --env E`: the `gcloud run deploy` flags of one service;
`mlpipe infra release-config --out DIR`: the Cloud Deploy pipelines, targets, Skaffold config
and Cloud Run manifests that carry a release through dev → staging → prod."""

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
from mlpipe_ops import infra, release, service_runtime
from mlpipe_ops.localstack import StackState, client_env

infra_app = typer.Typer(
    help="Provision the topology (topics, push subscriptions, dead letters, IAM, the bucket "
    "notification, schedules) from infra/environments/<env>.yaml and keep the Cloud Run "
    "services' runtime settings as infra/runtime.yaml says; render a service's deploy flags "
    "and the Cloud Deploy release configuration.",
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
    service: Annotated[
        str,
        typer.Argument(help="ingest, trainer, evaluator, deployer, predictor, notifier, console"),
    ],
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
        if service not in TOPOLOGY.deployed:
            raise infra.InfraError(
                f"{service!r} is not a service (known: {', '.join(TOPOLOGY.deployed)})"
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


def _per_env(values: list[str], option: str) -> dict[str, str]:
    """`ENV=VALUE` options as a mapping; an unknown environment is caught by the caller."""
    pairs = {}
    for value in values:
        env, sep, item = value.partition("=")
        if not sep or not env or not item:
            raise infra.InfraError(f"{option} {value!r}: expected ENV=VALUE, e.g. {option} prod=…")
        pairs[env] = item
    return pairs


@infra_app.command("release-config")
def release_config(
    out: Annotated[Path, typer.Option(help="The directory to write the configuration into.")],
    code_version: Annotated[str, typer.Option(help="The git commit the images were built from.")],
    image_tag: Annotated[
        str | None,
        typer.Option(
            help="The images' tag (cloudbuild/service.yaml: $SHORT_SHA); default: the "
            "first 7 characters of --code-version."
        ),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            help="Where the images are: REGION-docker.pkg.dev/PROJECT/REPOSITORY; "
            "default: the mlpipe repository of the first environment's project and region."
        ),
    ] = None,
    service: Annotated[
        list[str] | None,
        typer.Option(help="Only this service (repeatable); a release carries one. Default: all."),
    ] = None,
    project: Annotated[
        list[str] | None,
        typer.Option(help="ENV=PROJECT: another project than that environment file's."),
    ] = None,
    project_number: Annotated[
        list[str] | None,
        typer.Option(help="ENV=NUMBER: that project's number, if its file has none."),
    ] = None,
    environments_dir: EnvironmentsDir = None,
) -> None:
    """Render the Cloud Deploy configuration of the services' releases into OUT:
    clouddeploy.yaml (a delivery pipeline mlpipe-SERVICE per service, dev → staging → prod,
    approval before prod; one target per environment), skaffold.yaml (a profile per environment)
    and manifests/ENV/SERVICE.yaml (each Cloud Run service as infra/runtime.yaml and
    infra/environments/ENV.yaml say, its image a placeholder the release replaces)."""
    services = list(service or TOPOLOGY.deployed)
    try:
        unknown = [s for s in services if s not in TOPOLOGY.deployed]
        if unknown:
            raise infra.InfraError(
                f"{unknown[0]!r} is not a service (known: {', '.join(TOPOLOGY.deployed)})"
            )
        projects = _per_env(project or [], "--project")
        numbers = _per_env(project_number or [], "--project-number")
        for env in [*projects, *numbers]:
            if env not in release.PROMOTION:
                raise infra.InfraError(
                    f"{env!r} is not a release stage (stages: {', '.join(release.PROMOTION)})"
                )
        stages = []
        for env in release.PROMOTION:
            environment = infra.load_environment(env, environments_dir)
            if environment.target != "gcp":
                raise infra.InfraError(f"env {env} is not a gcp environment; it cannot be a stage")
            runtimes = service_runtime.load_runtimes(
                env, service_runtime.runtime_file(environments_dir)
            )
            number = numbers.get(env)
            target = infra.resolve(
                environment,
                env,
                project=projects.get(env),
                project_number=int(number) if number is not None else None,
                runtimes=runtimes,
            )
            stages.append(release.Stage(env, target, runtimes))
        first = stages[0].target
        files = release.release_files(
            stages,
            services=services,
            registry=registry or f"{first.region}-docker.pkg.dev/{first.project}/mlpipe",
            tag=image_tag or code_version[:7],
            code_version=code_version,
        )
    except (infra.InfraError, service_runtime.RuntimeDefinitionError) as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:  # a --project-number that is not a number
        raise _fail(f"--project-number: {exc}") from None
    for relative, text in files.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    typer.echo(
        f"wrote {out}: pipelines {', '.join(release.pipeline_id(s) for s in services)} "
        f"({' → '.join(s.env for s in stages)}; approval before "
        f"{', '.join(release.approval_stages(stages)) or 'none'}), "
        f"in {first.project} ({first.region})",
        err=True,
    )
