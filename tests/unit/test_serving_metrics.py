"""GET /metrics through prometheus_client keeps the names, labels and values dashboards read.

data/serving_metrics_before.prom is what the hand-written renderer this replaced answered for
the observations below; the same observations must give the same series.
"""

from __future__ import annotations

import math
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mlpipe_predictor.monitoring import ServingMetrics

BEFORE = Path(__file__).parent / "data" / "serving_metrics_before.prom"
LOG_COUNTS = {"sampled": 12, "dropped": 3, "written": 9, "write_failed": 0}


def observed() -> ServingMetrics:
    metrics = ServingMetrics()
    metrics.observe("iris-classifier", "1", 0.0003, True, 1)
    metrics.observe("iris-classifier", "1", 0.004, True, 8)
    metrics.observe("iris-classifier", "1", 0.3, False, 2)
    metrics.observe("iris-classifier", "2", 3.0, True, 1)
    metrics.observe('odd "name"', "7", 0.001, True, 1)
    return metrics


def families(text: str) -> dict[str, tuple[str, str]]:
    """{family name: (type, help)} of a Prometheus text page."""
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value}; `le` compared as a number (1 and 1.0 are one bound)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: (repr(float(v)) if k == "le" else v) for k, v in sample.labels.items()}
            out[(sample.name, frozenset(labels.items()))] = sample.value
    return out


def test_the_same_observations_give_the_same_families_series_and_values() -> None:
    before = BEFORE.read_text()

    after = observed().render(LOG_COUNTS)

    assert families(after) == families(before)
    old, new = samples(before), samples(after)
    assert set(new) == set(old)
    for key, value in old.items():
        assert math.isclose(new[key], value, rel_tol=1e-9, abs_tol=1e-9), key


def test_the_page_names_exactly_the_metrics_dashboards_read() -> None:
    names = {
        s.name
        for f in text_string_to_metric_families(observed().render(LOG_COUNTS))
        for s in f.samples
    }

    assert names == {
        "mlpipe_predict_requests_total",
        "mlpipe_predict_errors_total",
        "mlpipe_predict_instances_total",
        "mlpipe_predict_latency_seconds_bucket",
        "mlpipe_predict_latency_seconds_sum",
        "mlpipe_predict_latency_seconds_count",
        "mlpipe_prediction_log_records_total",
    }


def test_without_a_prediction_log_its_counts_are_left_out() -> None:
    names = {name for name, _ in samples(observed().render(None))}

    assert "mlpipe_prediction_log_records_total" not in names
    assert "mlpipe_predict_requests_total" in names


def test_snapshot_reads_the_same_counts() -> None:
    snapshot = observed().snapshot()

    assert snapshot["iris-classifier/1"] == {
        "requests": 3,
        "errors": 1,
        "instances": 11,
        "mean_latency_ms": round(1000 * (0.0003 + 0.004 + 0.3) / 3, 3),
    }
    assert set(snapshot) == {"iris-classifier/1", "iris-classifier/2", 'odd "name"/7'}
