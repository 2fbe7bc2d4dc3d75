"""The Earth Engine export request as plain data, and task polling with scripted states."""

from __future__ import annotations

from typing import Any

import pytest

from mlpipe.errors import PermanentError
from mlpipe_ingest.sources_earthengine import ExportSpec, build_export_request, wait_for_export

SPEC = ExportSpec(
    asset="COPERNICUS/S2_SR_HARMONIZED/20260601T103031_20260601T103559_T31TFJ",
    bands=("B2", "B3", "B4", "B8"),
    scale=10,
    region=((4.80, 45.70), (4.90, 45.70), (4.90, 45.80)),
    bucket="mlpipe-raw",
    file_prefix="earthengine/crops/2026-06-01",
)


def test_the_export_request_is_what_toCloudStorage_is_called_with() -> None:
    assert build_export_request(SPEC) == {
        "collection": {
            "image": SPEC.asset,
            "select": ["B2", "B3", "B4", "B8"],
            "sample": {
                "region": {
                    "type": "Polygon",
                    "coordinates": [[[4.8, 45.7], [4.9, 45.7], [4.9, 45.8], [4.8, 45.7]]],
                },
                "scale": 10,
                "geometries": False,
            },
        },
        "description": "earthengine_crops_2026-06-01",
        "bucket": "mlpipe-raw",
        "fileNamePrefix": "earthengine/crops/2026-06-01",
        "fileFormat": "CSV",
        "selectors": ["B2", "B3", "B4", "B8"],
    }


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"bands": ()}, "bands"),
        ({"scale": 0}, "scale"),
        ({"region": ((0, 0), (1, 1))}, "region"),
        ({"bucket": "Bad_Bucket!"}, "bucket"),
        ({"file_prefix": "../x"}, "prefix"),
        ({"file_format": "TFRecord"}, "CSV"),
    ],
)
def test_a_bad_export_is_refused_before_it_starts(change: dict[str, Any], problem: str) -> None:
    spec = ExportSpec(**{**SPEC.__dict__, **change})

    with pytest.raises(PermanentError) as caught:
        build_export_request(spec)
    assert caught.value.reason == "invalid_export" and problem in caught.value.message


class ScriptedTasks:
    """Answers `status` with the given states in turn (the last one repeats)."""

    def __init__(self, *states: dict[str, Any]) -> None:
        self.states = list(states)
        self.started: list[dict[str, Any]] = []
        self.polls = 0

    def start(self, request: dict[str, Any]) -> str:
        self.started.append(request)
        return "T1"

    def status(self, task_id: str) -> dict[str, Any]:
        self.polls += 1
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_polling_returns_the_files_when_the_task_completes() -> None:
    tasks = ScriptedTasks(
        {"state": "READY"},
        {"state": "RUNNING"},
        {"state": "COMPLETED", "destination_uris": ["gs://mlpipe-raw/earthengine/x.csv"]},
    )
    clock = Clock()

    uris = wait_for_export(tasks, "T1", timeout=100, poll=10, clock=clock, sleep=clock.sleep)

    assert uris == ["gs://mlpipe-raw/earthengine/x.csv"] and tasks.polls == 3 and clock.now == 20


@pytest.mark.parametrize(
    ("states", "reason", "in_message"),
    [
        (
            [{"state": "RUNNING"}, {"state": "FAILED", "error_message": "quota"}],
            "ee_task_failed",
            "quota",
        ),
        ([{"state": "CANCELLED"}], "ee_task_failed", "CANCELLED"),
        ([{"state": "RUNNING"}], "ee_timeout", "still RUNNING after 60s"),
        ([{"state": "COMPLETED", "destination_uris": []}], "ee_no_output", "without files"),
    ],
)
def test_a_failed_or_slow_task_is_a_permanent_failure(
    states: list[dict[str, Any]], reason: str, in_message: str
) -> None:
    clock = Clock()

    with pytest.raises(PermanentError) as caught:
        wait_for_export(
            ScriptedTasks(*states), "T1", timeout=60, poll=10, clock=clock, sleep=clock.sleep
        )

    assert caught.value.reason == reason and in_message in caught.value.message
    assert clock.now <= 60
