"""`mlpipe promote MODEL VERSION --to ENV [--from ENV]`, `mlpipe approvals`, `mlpipe approve`
and `mlpipe reject`: a registered model version through the environments, dev → staging →
prod, with an approval where the environment's file says `approval: required`
(docs/promotion.md).

Thin: the environment files (infra/environments/<env>.yaml) say where each environment is,
release.PROMOTION gives the order, mlpipe.runtime.promotion does the rest. `mlpipe promote
MODEL` without --to still promotes the model's canary on the local stack (cli_rollout).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from google.api_core import exceptions as gexc
from google.auth.exceptions import DefaultCredentialsError

from mlpipe.messaging.publishing import Publisher
from mlpipe.runtime import promotion
from mlpipe.store import layout
from mlpipe.store.approvals import ApprovalRequest, Approvals
from mlpipe.store.promotions import Refusal, previous_env
from mlpipe.store.storage import Storage, make_client
from mlpipe_ops import cli_rollout, infra
from mlpipe_ops.actor import resolve_actor
from mlpipe_ops.localstack import StackState, client_env
from mlpipe_ops.release import PROMOTION

DEFAULT_STATE_DIR = Path(".mlpipe")
StateDir = Annotated[
    Path,
    typer.Option(
        help="The local stack's state (environments on the emulators).", envvar="MLPIPE_STATE_DIR"
    ),
]
EnvironmentsDir = Annotated[
    Path | None,
    typer.Option(help="Where <env>.yaml files are.", envvar="MLPIPE_INFRA_DIR"),
]
ActingAs = Annotated[
    str | None,
    typer.Option(
        "--as",
        help="Who you are, for the records; else MLPIPE_ACTOR, else your gcloud account, else "
        "your OS user.",
    ),
]
EnvOption = Annotated[str, typer.Option("--env", help="The environment the request is in.")]
EMULATOR_VARIABLES = ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")


def _fail(message: str) -> typer.Exit:
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(1)


@contextlib.contextmanager
def _clients_for(kinds: set[str], names: list[str], state_dir: Path) -> Iterator[None]:
    """The client libraries pointed at the emulators or at GCP, as the environments need."""
    if kinds == {"gcp"}:
        set_vars = [v for v in EMULATOR_VARIABLES if os.environ.get(v)]
        if set_vars:
            # The client libraries would silently talk to the emulator instead.
            raise infra.InfraError(
                f"{' and '.join(set_vars)} set: unset it to reach {', '.join(names)} on GCP"
            )
        yield
        return
    if all(os.environ.get(v) for v in EMULATOR_VARIABLES):
        yield
        return
    state = StackState.load(state_dir)
    if state is None or not state.running():
        raise infra.InfraError(
            f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} on the emulators, which "
            f"are not running (state dir {state_dir}): start them with `mlpipe up`, or set "
            f"{' and '.join(EMULATOR_VARIABLES)}"
        )
    with client_env(state):
        yield


@contextlib.contextmanager
def places(
    names: list[str], directory: Path | None, state_dir: Path
) -> Iterator[dict[str, promotion.Place]]:
    """Each named environment as a promotion sees it, from its file."""
    try:
        loaded = {name: infra.load_environment(name, directory) for name in dict.fromkeys(names)}
        kinds: set[str] = {env.target for env in loaded.values()}
        if len(kinds) > 1:
            where = ", ".join(f"{n} ({e.target})" for n, e in loaded.items())
            raise infra.InfraError(
                f"{where}: the emulators and GCP cannot be reached from one command"
            )
        with _clients_for(kinds, list(loaded), state_dir):
            found = {}
            for name, env in loaded.items():
                project, bucket = infra.storage_place(env, name)
                found[name] = promotion.Place(
                    env=name,
                    project=project,
                    storage=Storage(make_client(project), bucket),
                    publisher=Publisher(project),
                    approval_required=env.approval_required,
                    approval_expires_hours=env.approval_expires_hours,
                )
            yield found
    except infra.InfraError as exc:
        raise _fail(str(exc)) from None
    except DefaultCredentialsError as exc:
        raise _fail(
            f"no Google credentials ({exc}); run `gcloud auth application-default login`"
        ) from None
    except gexc.GoogleAPICallError as exc:
        raise _fail(f"{type(exc).__name__}: {exc.message}") from None


def _report(outcome: promotion.Outcome) -> None:
    if not outcome.ok:
        raise _fail(f"{outcome.status}: {outcome.message}")
    typer.echo(f"{outcome.status}: {outcome.message}")


def promote(
    model: Annotated[str, typer.Argument(help="The registered model's name.")],
    version: Annotated[
        int | None,
        typer.Argument(help="With --to: the version in the source environment's registry."),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help=f"Promote VERSION into this environment ({' → '.join(PROMOTION)}). Without "
            "it: give MODEL's canary 100% of the traffic on the local stack.",
        ),
    ] = None,
    from_env: Annotated[
        str | None,
        typer.Option("--from", help="Where VERSION is; default: the environment before --to."),
    ] = None,
    acting_as: ActingAs = None,
    environments_dir: EnvironmentsDir = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Promote a model version to the next environment (its gates run again there; an
    approval first where the environment requires one), or, with only MODEL, its canary."""
    if to is None:
        if version is not None or from_env is not None:
            raise _fail("VERSION and --from promote into an environment: add --to ENV")
        cli_rollout.promote(model, state_dir)
        return
    if version is None:
        raise _fail(f"--to {to}: which version? `mlpipe promote {model} VERSION --to {to}`")
    try:
        source_env = from_env or previous_env(PROMOTION, to)
    except Refusal as refusal:
        raise _fail(f"refused: {refusal.message}") from None
    actor = resolve_actor(acting_as)
    with places([source_env, to], environments_dir, state_dir) as found:
        outcome = promotion.promote(found[source_env], found[to], model, version, actor, PROMOTION)
    _report(outcome)


def _approval_envs(directory: Path | None) -> list[str]:
    """The environments of the promotion order whose file requires approval."""
    names = []
    for name in PROMOTION:
        try:
            if infra.load_environment(name, directory).approval_required:
                names.append(name)
        except infra.InfraError:
            continue  # no such file here: nothing to list for it
    return names


def _row(request: ApprovalRequest, now: dt.datetime) -> str:
    status = request.status(now)
    decided = f"  {request.decided()}" if request.state != "pending" else ""
    return (
        f"  {request.id}  {status:<8}  {request.model} v{request.version}  "
        f"{request.from_env} → {request.to_env}  by {request.requested_by}  "
        f"at {request.requested_at:%Y-%m-%d %H:%M}  expires {request.expires_at:%Y-%m-%d %H:%M}"
        f"{decided}"
    )


def approvals(
    env: Annotated[
        str | None,
        typer.Option("--env", help="Only this environment; default: each that requires approval."),
    ] = None,
    environments_dir: EnvironmentsDir = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """List promotion approval requests: pending ones first, expired ones shown as expired."""
    names = [env] if env else _approval_envs(environments_dir)
    if not names:
        typer.echo(f"no environment of {' → '.join(PROMOTION)} requires approval")
        return
    now = dt.datetime.now(dt.UTC)
    for name in names:
        with places([name], environments_dir, state_dir) as found:
            place = found[name]
            listed = Approvals(place.storage).listing(now)
        waiting = sum(1 for r in listed if r.status(now) == "pending")
        typer.echo(
            f"{name}: {waiting} pending of {len(listed)} request(s) "
            f"(gs://{place.bucket}/{layout.APPROVALS}; times UTC)"
        )
        for request in listed:
            typer.echo(_row(request, now))


def approve(
    approval_id: Annotated[str, typer.Argument(help="The request's id (`mlpipe approvals`).")],
    env: EnvOption,
    acting_as: ActingAs = None,
    environments_dir: EnvironmentsDir = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Approve a pending promotion request and carry the promotion out."""
    actor = resolve_actor(acting_as)
    with places([env], environments_dir, state_dir) as found:
        request = (
            Approvals(found[env].storage).get(approval_id)
            if layout.APPROVAL_ID_PATTERN.match(approval_id)
            else None
        )
    if request is None:
        raise _fail(f"{promotion.NOT_FOUND}: no approval {approval_id} in {env}")
    with places([request.from_env, env], environments_dir, state_dir) as found:
        outcome = promotion.approve(
            found[request.from_env], found[env], approval_id, actor, PROMOTION
        )
    _report(outcome)


def reject(
    approval_id: Annotated[str, typer.Argument(help="The request's id (`mlpipe approvals`).")],
    env: EnvOption,
    reason: Annotated[str, typer.Option("--reason", help="Why: recorded with the decision.")],
    acting_as: ActingAs = None,
    environments_dir: EnvironmentsDir = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Reject a pending promotion request, with the reason; nothing is promoted."""
    actor = resolve_actor(acting_as)
    with places([env], environments_dir, state_dir) as found:
        outcome = promotion.reject(found[env], approval_id, actor, reason)
    _report(outcome)


def register(app: typer.Typer) -> None:
    app.command()(promote)
    app.command()(approvals)
    app.command()(approve)
    app.command()(reject)
