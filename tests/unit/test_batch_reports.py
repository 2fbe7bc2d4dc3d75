"""The batch job's bundle reports: what the finish step sums into the metrics."""

from __future__ import annotations

import pickle

from mlpipe_batch.pipeline import REJECTED, BundleReport


def report(source: str, rows: int, bad: list[tuple[int, str]], shards: list[str]) -> BundleReport:
    out = BundleReport()
    for uri in shards:
        out.add_shard(REJECTED if "/rejected/" in uri else "predictions", uri)
    for row, reason in bad:
        out.add_bad((source, row, reason))
    out.add_counts(rows, rows - len(bad), len(bad))
    return out


def test_the_total_sums_the_rows_and_lists_every_shard_by_kind() -> None:
    reports = [
        report("gs://b/in/a.csv", 100, [], ["gs://b/out/predictions-1.avro"]),
        report(
            "gs://b/in/b.csv",
            50,
            [(7, "x is not a number")],
            ["gs://b/out/predictions-2.avro", "gs://b/out/rejected/rejected-3.avro"],
        ),
    ]

    total = BundleReport.total(reports)

    assert (total.rows, total.scored, total.bad) == (150, 149, 1)
    assert total.outputs == ["gs://b/out/predictions-1.avro", "gs://b/out/predictions-2.avro"]
    assert total.rejected == ["gs://b/out/rejected/rejected-3.avro"]


def test_the_first_bad_row_is_the_first_by_file_then_row_whatever_the_bundles_order() -> None:
    later = report("gs://b/in/b.csv", 10, [(2, "late")], [])
    earlier = report("gs://b/in/a.csv", 10, [(9, "in a, row 9"), (4, "in a, row 4")], [])
    clean = report("gs://b/in/a.csv", 10, [], [])

    forward = BundleReport.total([later, clean, earlier])
    backward = BundleReport.total([earlier, clean, later])

    assert forward.first_bad == ("gs://b/in/a.csv", 4, "in a, row 4")
    assert backward.first_bad == forward.first_bad


def test_no_bad_row_leaves_no_first_bad_row_and_an_empty_job_sums_to_nothing() -> None:
    assert BundleReport.total([report("gs://b/in/a.csv", 5, [], [])]).first_bad is None
    empty = BundleReport.total([])
    assert (empty.rows, empty.outputs, empty.first_bad) == (0, [], None)


def test_a_report_survives_the_runner_s_pickling() -> None:
    original = report("gs://b/in/a.csv", 3, [(1, "y is missing")], ["gs://b/out/p.avro"])

    assert pickle.loads(pickle.dumps(original)) == original
