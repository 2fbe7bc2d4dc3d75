"""`mlpipe schedule`: the minimal cron matcher and the foreground loop, with a scripted clock."""

from __future__ import annotations

import datetime as dt

import pytest

from mlpipe_ops.cli_schedule import CronError, cron_matches, loop
from mlpipe_ops.infra import ScheduleSpec

UTC = dt.UTC


@pytest.mark.parametrize(
    ("expression", "when", "fires"),
    [
        ("0 6 * * *", dt.datetime(2026, 6, 1, 6, 0), True),
        ("0 6 * * *", dt.datetime(2026, 6, 1, 6, 1), False),
        ("*/15 * * * *", dt.datetime(2026, 6, 1, 3, 45), True),
        ("*/15 * * * *", dt.datetime(2026, 6, 1, 3, 46), False),
        ("0 9-17/4 * * 1-5", dt.datetime(2026, 6, 1, 13, 0), True),  # a Monday
        ("0 9 * * 0", dt.datetime(2026, 6, 7, 9, 0), True),  # Sunday as 0
        ("0 9 * * 7", dt.datetime(2026, 6, 7, 9, 0), True),  # ... and as 7
        ("0 9 1 * 1", dt.datetime(2026, 6, 8, 9, 0), True),  # either day field, as cron
        ("30 2 1,15 6 *", dt.datetime(2026, 6, 15, 2, 30), True),
    ],
)
def test_cron_matching(expression: str, when: dt.datetime, fires: bool) -> None:
    assert cron_matches(expression, when) is fires


@pytest.mark.parametrize("expression", ["0 6 * *", "61 * * * *", "0 6 * JAN *", "*/0 * * * *"])
def test_unreadable_cron_is_an_error(expression: str) -> None:
    with pytest.raises(CronError):
        cron_matches(expression, dt.datetime(2026, 6, 1))


def schedule(cron: str, zone: str = "Etc/UTC") -> ScheduleSpec:
    return ScheduleSpec(
        name="s",
        schedule=cron,
        time_zone=zone,
        request={"dataset": "iris", "inline": {"csv": "a\n1\n"}},
    )


def test_the_loop_fires_once_per_matching_minute_in_the_schedules_zone() -> None:
    # 04:59 .. 05:03 UTC is 06:59 .. 07:03 in Berlin (summer): "0 7 * * *" fires once.
    minutes = [
        dt.datetime(2026, 6, 1, 4, 59, tzinfo=UTC) + dt.timedelta(minutes=i) for i in range(5)
    ]
    clock = iter(t for m in minutes for t in (m, m))  # each check reads the time twice
    fired: list[str] = []

    count = loop(
        schedule("0 7 * * *", "Europe/Berlin"),
        lambda: fired.append("x") or "id",
        None,
        now=lambda: next(clock),
        sleep=lambda _: None,
        rounds=5,
    )

    assert count == 1 and fired == ["x"]


def test_every_fires_on_each_round() -> None:
    waits: list[float] = []

    count = loop(schedule("0 7 * * *"), lambda: "id", 2.5, sleep=waits.append, rounds=3)

    assert count == 3 and waits == [2.5, 2.5, 2.5]
