"""Run identity, the dataset path rule, and every bucket path built in one place."""

from __future__ import annotations

import datetime as dt

import pytest

from mlpipe.messaging.topology import TOPOLOGY
from mlpipe.store import layout
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


DAY = dt.date(2026, 11, 23)


def test_every_kind_of_path_has_its_documented_form() -> None:
    registry = layout.RegistryPaths("iris-classifier")
    drift = layout.DriftCheckPaths("iris-classifier", "check-1")

    assert layout.dataset_path("iris", DAY, "abc", "csv") == "datasets/iris/dt=2026-11-23/abc.csv"
    assert layout.pipeline_config_path("iris") == "pipelines/iris/config.yaml"
    assert layout.RunPaths("0123456789abcdef").evaluation == "runs/0123456789abcdef/evaluation.json"
    assert layout.quarantine_path("missing_column", "ingest", "m1") == (
        "quarantine/missing_column/ingest-m1"
    )
    assert registry.version_record(3) == "registry/iris-classifier/versions/3/version.json"
    assert registry.alias("champion") == "registry/iris-classifier/aliases/champion"
    assert registry.run_claim("r1") == "registry/iris-classifier/runs/r1.json"
    assert registry.version_claim(3) == "registry/iris-classifier/version-claims/3"
    assert drift.page == "monitoring/iris-classifier/reports/check-1/drift.html"
    assert layout.batch_output_path("iris-classifier", DAY, "b1") == (
        "predictions/iris-classifier/dt=2026-11-23/b1.avro"
    )
    assert layout.batch_metrics_path("iris-classifier", "b1") == (
        "predictions/iris-classifier/metrics/b1.json"
    )


def test_the_prediction_log_the_predictor_writes_is_what_the_drift_check_lists() -> None:
    written = layout.prediction_log_path("iris-classifier", DAY, "101500-abc")

    assert written == "monitoring/iris-classifier/dt=2026-11-23/101500-abc.jsonl"
    assert written.startswith(layout.prediction_log_prefix("iris-classifier", DAY))


def test_a_registry_listing_gives_complete_versions_and_model_names() -> None:
    listing = [
        "registry/a/versions/1/model.joblib",
        "registry/a/versions/1/version.json",
        "registry/a/versions/2/model.joblib",
        "registry/b/aliases/champion",
    ]

    assert [layout.RegistryPaths.version_of_record(p) for p in listing] == [None, 1, None, None]
    assert layout.registry_models(listing) == ["a", "b"]


def test_run_ids_come_from_a_listing_of_runs() -> None:
    listing = ["runs/bbb/claim.json", "runs/aaa/config.json", "runs/bbb/model.joblib"]

    assert layout.run_ids(listing) == ["aaa", "bbb"]


def test_the_bucket_notification_watches_the_datasets_prefix() -> None:
    assert TOPOLOGY.notification.object_prefix == layout.DATASETS
    assert layout.DATASET_PATH.match(layout.dataset_path("iris", DAY, "x", "parquet"))


def test_pending_reports_are_listed_by_run_id() -> None:
    listing = [
        layout.pending_report_path("0123456789abcdef"),
        layout.pending_report_path("fedcba9876543210"),
        layout.PENDING_REPORTS + "not-a-run-id",
        "runs/0123456789abcdef/report.html",
    ]

    assert layout.pending_report_runs(listing) == ["0123456789abcdef", "fedcba9876543210"]
    assert layout.RunPaths("0123456789abcdef").plots == "runs/0123456789abcdef/plots.json"


def test_a_notice_record_is_one_object_per_channel_and_key() -> None:
    assert (
        layout.notification_path("ml-team", "gate_blocked-680351e2d2b6804f")
        == "notifications/ml-team/gate_blocked-680351e2d2b6804f.json"
    )
    for channel, key in [("../x", "k"), ("team", "a/b"), ("team", ""), ("team", "a..b")]:
        with pytest.raises(ValueError, match="cannot name an object"):
            layout.notification_path(channel, key)
