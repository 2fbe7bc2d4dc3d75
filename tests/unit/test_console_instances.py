"""The models page's per-instance states, from the predictor instances' own records."""

from __future__ import annotations

import datetime as dt

from mlpipe_console.reading import SILENT_AFTER, instance_states

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
SPLIT = [(1, 80, "champion"), (2, 20, "canary")]


def record(name: str, ago: dt.timedelta, serving: list[tuple[int, int]], **more: str) -> dict:
    return {
        "instance": name,
        "updated_at": (NOW - ago).isoformat(),
        "serving": [{"version": v, "percent": p, "alias": "x"} for v, p in serving],
        **more,
    }


def test_live_silent_and_stopped_instances_and_whether_each_follows_the_split() -> None:
    records = [
        record("old", SILENT_AFTER + dt.timedelta(seconds=1), [(1, 80), (2, 20)]),
        record("behind", dt.timedelta(seconds=5), [(1, 100)]),
        record("fresh", dt.timedelta(seconds=1), [(1, 80), (2, 20)]),
        record("gone", dt.timedelta(seconds=2), [(1, 80), (2, 20)], stopped_at=NOW.isoformat()),
        {"instance": "unreadable", "updated_at": "yesterday"},
    ]

    shown = instance_states(records, NOW, SPLIT)

    assert [(r["instance"], r["state"], r["follows"]) for r in shown] == [
        ("fresh", "live", True),
        ("behind", "live", False),
        ("gone", "stopped", True),
        ("old", "silent", True),
    ]
