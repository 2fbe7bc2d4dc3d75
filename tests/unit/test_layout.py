"""Run identity and the dataset path rule."""

from __future__ import annotations

import datetime as dt

import pytest

from mlpipe.store.layout import DATASET_PATH, RUN_ID_PATTERN, dataset_path, run_id_for

DATASET_SHA = "a" * 64
CONFIG_SHA = "b" * 64


def test_the_run_id_is_deterministic() -> None:
    assert run_id_for(DATASET_SHA, CONFIG_SHA) == run_id_for(DATASET_SHA, CONFIG_SHA)


def test_the_run_id_is_sixteen_lowercase_hex_characters() -> None:
    run_id = run_id_for(DATASET_SHA, CONFIG_SHA)

    assert len(run_id) == 16
    assert set(run_id) <= set("0123456789abcdef")
    assert RUN_ID_PATTERN.match(run_id)


def test_the_run_id_changes_with_the_dataset() -> None:
    assert run_id_for("c" * 64, CONFIG_SHA) != run_id_for(DATASET_SHA, CONFIG_SHA)


def test_the_run_id_changes_with_the_config() -> None:
    assert run_id_for(DATASET_SHA, "c" * 64) != run_id_for(DATASET_SHA, CONFIG_SHA)


def test_the_two_hashes_are_not_interchangeable() -> None:
    assert run_id_for(CONFIG_SHA, DATASET_SHA) != run_id_for(DATASET_SHA, CONFIG_SHA)


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_a_dataset_path_is_recognised(ext: str) -> None:
    match = DATASET_PATH.match(f"datasets/iris/dt=2026-01-02/abc.{ext}")

    assert match is not None
    assert match.group("name", "date", "id", "ext") == ("iris", "2026-01-02", "abc", ext)


def test_dataset_path_builds_what_the_pattern_recognises() -> None:
    path = dataset_path("iris", dt.date(2026, 1, 2), "0123abcd", "parquet")

    assert path == "datasets/iris/dt=2026-01-02/0123abcd.parquet"
    assert DATASET_PATH.match(path)


@pytest.mark.parametrize(
    "path",
    [
        "datasets/iris/abc.csv",
        "datasets/iris/dt=2026-1-2/abc.csv",
        "datasets/iris/date=2026-01-02/abc.csv",
        "datasets/iris/dt=2026-01-02/abc.json",
        "datasets/iris/dt=2026-01-02/abc.csv.tmp",
        "datasets/iris/dt=2026-01-02/sub/abc.csv",
        "datasets/Iris/dt=2026-01-02/abc.csv",
        "datasets/1iris/dt=2026-01-02/abc.csv",
        "datasets/iris/dt=2026-01-02/.csv",
        "prefix/datasets/iris/dt=2026-01-02/abc.csv",
        "runs/0123456789abcdef/model.joblib",
    ],
)
def test_other_shapes_are_not_dataset_paths(path: str) -> None:
    assert DATASET_PATH.match(path) is None


def test_a_trailing_newline_does_not_pass_for_a_run_id_or_a_dataset_path() -> None:
    from mlpipe.store import layout

    assert layout.RUN_ID_PATTERN.match("0123456789abcdef")
    assert not layout.RUN_ID_PATTERN.match("0123456789abcdef\n")
    assert not layout.DATASET_PATH.match("datasets/iris/dt=2026-01-01/x.csv\n")
