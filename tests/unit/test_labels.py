"""Labels of cloud jobs and resources (mlpipe.runtime.labels), against Google's label rules
(https://cloud.google.com/resource-manager/docs/labels-overview#requirements) as the local
stand-ins check them (mlpipe_ops.standins.google_api.label_problem)."""

from __future__ import annotations

import pytest

from mlpipe.runtime.labels import label_key, label_value, labels, run_labels
from mlpipe_ops.standins.google_api import label_problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3f2a9c1d4e5b6a70", "3f2a9c1d4e5b6a70"),  # a run id passes unchanged
        ("Iris Flowers", "iris-flowers"),
        ("nightly.2026/12/02", "nightly-2026-12-02"),
        ("under_score-dash", "under_score-dash"),
        ("x" * 80, "x" * 63),
        ("", ""),
    ],
)
def test_a_label_value_is_lowercase_letters_digits_underscores_and_dashes_at_most_63(
    text: str, expected: str
) -> None:
    assert label_value(text) == expected
    assert label_problem({"k": label_value(text)}) == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [("mlpipe-run-id", "mlpipe-run-id"), ("Env", "env"), ("9lives", "k9lives"), ("", "k")],
)
def test_a_label_key_starts_with_a_lowercase_letter(text: str, expected: str) -> None:
    assert label_key(text) == expected
    assert label_problem({label_key(text): "v"}) == ""


def test_a_key_made_from_63_characters_that_need_a_letter_stays_at_63() -> None:
    key = label_key("1" * 63)

    assert len(key) == 63 and key.startswith("k")


def test_a_runs_labels_name_its_run_pipeline_and_environment_and_drop_empty_values() -> None:
    found = run_labels("3F2A9C1D4E5B6A70", "Bike Share", "prod", mlpipe_commit="ABC123.dirty")

    assert found == {
        "mlpipe-run-id": "3f2a9c1d4e5b6a70",
        "mlpipe-pipeline": "bike-share",
        "mlpipe-env": "prod",
        "mlpipe-commit": "abc123-dirty",
    }
    assert run_labels("", "iris", "dev") == {"mlpipe-pipeline": "iris", "mlpipe-env": "dev"}
    assert labels({"Team": "ML", "empty": ""}) == {"team": "ml"}


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"Team": "ml"}, "label key 'Team' must start with a lowercase letter"),
        ({"1st": "ml"}, "label key '1st' must start with a lowercase letter"),
        ({"": "ml"}, "label key '' must start with a lowercase letter"),
        ({"team": "ML"}, "label value 'ML' has 'L M'"),
        ({"team": "a.b"}, "label value 'a.b' has '.'"),
        ({"team": "x" * 64}, "longer than 63 characters"),
        ({f"k{i}": "v" for i in range(65)}, "65 labels: at most 64"),
    ],
)
def test_the_stand_ins_refuse_labels_the_rules_refuse(given: dict[str, str], problem: str) -> None:
    assert problem.replace(" ", "") in label_problem(given).replace(" ", "")


def test_the_stand_ins_accept_empty_values_international_lowercase_and_vertex_64() -> None:
    assert label_problem({"team": ""}) == ""
    assert label_problem({"équipe": "données"}) == ""
    assert label_problem({"k": "x" * 64}, max_length=64) == ""
