"""`mlpipe schedule`: fire an environment's Cloud Scheduler jobs against the local stack.

Cloud Scheduler is not emulated. `mlpipe schedule run NAME` publishes the schedule's
IngestRequest to the local stack's ingest topic once and follows the run it starts, hop by hop
(mlpipe_ops.run_progress), to the served model and, when the pipeline's config has `scoring:`,
to the new champion's predictions of the next days; `--loop` stays in the foreground and
publishes whenever the schedule's cron matches (checked each minute, in its time zone), or
every `--every` seconds instead. The cron matching is a minimal unix-cron: `*`, numbers,
ranges `a-b`, steps `*/n` and `a-b/n`, and lists; no month or weekday names (croniter is not a
dependency). When both day fields are restricted, either may match, as in cron.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import load_pipeline_config
from mlpipe.store.storage import Storage, make_client
from mlpipe_ops.follow import PROGRESS_TOPICS, EventWatcher
from mlpipe_ops.infra import InfraError, ScheduleSpec, load_environment
from mlpipe_ops.localstack import StackState, client_env
from mlpipe_ops.run_progress import SCORING_TOPICS, follow_run, stamp

schedule_app = typer.Typer(
    help="Fire Cloud Scheduler jobs on the local stack.", no_args_is_help=True
)

# (lowest, highest) of minute, hour, day of month, month, day of week (0 or 7 is Sunday).
RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


class CronError(ValueError):
    """A cron field this minimal matcher cannot read."""


def _values(field: str, low: int, high: int) -> set[int]:
    found: set[int] = set()
    for part in field.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = int(first), int(last)
        elif base.isdigit():
            start = end = int(base)
            if step_text:
                end = high
        else:
            raise CronError(f"cron field {field!r}: only numbers, *, ranges, steps and lists")
        if step < 1 or not low <= start <= end <= high:
            raise CronError(f"cron field {field!r} is outside {low}..{high}")
        found.update(range(start, end + 1, step))
    return found


def parse_cron(expression: str) -> list[set[int]]:
    fields = expression.split()
    if len(fields) != 5:
        raise CronError(f"{expression!r} is not a five-field cron expression")
    try:
        parsed = [_values(f, lo, hi) for f, (lo, hi) in zip(fields, RANGES, strict=True)]
    except ValueError as exc:
        raise CronError(f"{expression!r}: {exc}") from exc
    if 7 in parsed[4]:
        parsed[4].add(0)
    return parsed


def cron_matches(expression: str, when: dt.datetime) -> bool:
    """Whether `when` (already in the schedule's time zone) is a minute the cron fires."""
    minute, hour, day, month, weekday = parse_cron(expression)
    fields = expression.split()
    cron_weekday = (when.weekday() + 1) % 7  # cron: Sunday is 0
    day_ok = when.day in day
    weekday_ok = cron_weekday in weekday
    both_restricted = fields[2] != "*" and fields[4] != "*"
    days = (day_ok or weekday_ok) if both_restricted else (day_ok and weekday_ok)
    return when.minute in minute and when.hour in hour and when.month in month and days


def scores(storage: Storage, schedule: ScheduleSpec) -> bool | None:
    """Whether the schedule's pipeline has `scoring:` (None: no registered config)."""
    if schedule.kind != "ingest":
        return False
    name = schedule.ingest_request().dataset
    try:
        return load_pipeline_config(storage, name).scoring is not None
    except PermanentError as exc:
        if exc.reason == "unknown_pipeline":
            return None
        raise


def fire(schedule: ScheduleSpec, publisher: Publisher) -> str:
    """Publish the schedule's request with a fresh request id and time; return the id."""
    request = schedule.message()
    request.request_id = f"{schedule.name}-{uuid.uuid4().hex[:12]}"
    request.requested_at.CopyFrom(events.timestamp())
    publisher.publish(request, attributes={"request_id": request.request_id})
    return request.request_id


def loop(
    schedule: ScheduleSpec,
    publish: Callable[[], str],
    every: float | None,
    *,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    sleep: Callable[[float], None] = time.sleep,
    rounds: int | None = None,
) -> int:
    """Fire on the cron (or every `every` seconds) until interrupted or `rounds` checks."""
    zone = zoneinfo.ZoneInfo(schedule.time_zone)
    fired = 0
    last_minute: dt.datetime | None = None
    checks = 0
    while rounds is None or checks < rounds:
        checks += 1
        if every:
            publish()
            fired += 1
            sleep(every)
            continue
        current = now().astimezone(zone).replace(second=0, microsecond=0)
        if current != last_minute and cron_matches(schedule.schedule, current):
            publish()
            fired += 1
        last_minute = current
        sleep(60 - now().second + 0.5)
    return fired


def find_schedule(env: str, name: str, directory: Path | None = None) -> ScheduleSpec:
    environment = load_environment(env, directory)
    for schedule in environment.schedules:
        if schedule.name == name:
            return schedule
    known = ", ".join(s.name for s in environment.schedules) or "none"
    raise InfraError(f"environment {env!r} has no schedule {name!r} (known: {known})")


def fire_and_follow(
    state: StackState, schedule: ScheduleSpec, publisher: Publisher, timeout: float
) -> int:
    """Fire once and print the run's hops; the exit code of `follow_run`."""
    storage = Storage(make_client(state.project), state.bucket)
    try:
        scoring = scores(storage, schedule)
    except PermanentError as exc:
        typer.secho(exc.message, fg=typer.colors.RED, err=True)
        return 1
    if scoring is None:
        dataset = schedule.ingest_request().dataset
        typer.secho(
            f"pipeline {dataset!r} has no registered config: ingest would reject the request; "
            f"register it first (`mlpipe pipeline apply examples/{dataset}/pipeline.yaml`)",
            fg=typer.colors.RED,
            err=True,
        )
        return 1
    topics = SCORING_TOPICS if scoring else PROGRESS_TOPICS
    with EventWatcher(state.project, topics) as watcher:
        t0 = time.monotonic()
        request_id = fire(schedule, publisher)
        typer.echo(f"{stamp(t0)} fired {schedule.name}: request {request_id}")
        return follow_run(state, watcher, request_id, t0, timeout, scoring=scoring)


@schedule_app.command("run")
def run_schedule(
    name: Annotated[str, typer.Argument(help="The schedule's name in the environment file.")],
    env: Annotated[
        str, typer.Option(help="infra/environments/<env>.yaml to read it from.")
    ] = "dev",
    loop_: Annotated[
        bool, typer.Option("--loop", help="Stay in the foreground, firing on the cron.")
    ] = False,
    every: Annotated[
        float | None, typer.Option(help="With --loop: fire every N seconds, not on the cron.")
    ] = None,
    follow: Annotated[
        bool, typer.Option(help="Once: follow the run it starts to its end (ingest requests).")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow the run.")] = 600.0,
    state_dir: Annotated[
        Path, typer.Option(help="The local stack's state dir.", envvar="MLPIPE_STATE_DIR")
    ] = Path(".mlpipe"),
) -> None:
    """Publish a schedule's IngestRequest to the local stack, once (following the run) or on
    its cron."""
    try:
        schedule = find_schedule(env, name)
        parse_cron(schedule.schedule)
    except (InfraError, CronError) as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    state = StackState.load(state_dir)
    if state is None:
        typer.secho("the local stack is not running; start it with `mlpipe up`", err=True)
        raise typer.Exit(1)
    with client_env(state):
        publisher = Publisher(state.project)

        def publish() -> str:
            request_id = fire(schedule, publisher)
            typer.echo(f"{dt.datetime.now(dt.UTC):%H:%M:%S} fired {name}: request {request_id}")
            return request_id

        if not loop_:
            if not follow or schedule.kind != "ingest":
                publish()
                return
            raise typer.Exit(fire_and_follow(state, schedule, publisher, timeout))
        typer.echo(
            f"{name}: every {every}s"
            if every
            else f"{name}: '{schedule.schedule}' {schedule.time_zone}; Ctrl-C stops"
        )
        try:
            loop(schedule, publish, every)
        except KeyboardInterrupt:
            typer.echo("stopped")
