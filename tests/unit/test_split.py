"""The deterministic train/holdout split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mlpipe.errors import PermanentError
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.ml.split import Split, split_rows

REPO = Path(__file__).resolve().parents[2]
IRIS_CSV = REPO / "examples/iris/iris.csv"
IRIS_YAML = (REPO / "examples/iris/pipeline.yaml").read_text()
IRIS_CONFIG = parse_config(IRIS_YAML)

SMALL_YAML = """\
name: small
dataset:
  target: label
  min_rows: 3
  max_rows: 6
model:
  name: small-model
"""


@pytest.fixture(scope="module")
def iris() -> pd.DataFrame:
    return pd.read_csv(IRIS_CSV)


def _config(extra: str = "") -> PipelineConfig:
    return parse_config(SMALL_YAML + extra)


def test_the_same_seed_gives_the_same_split(iris: pd.DataFrame) -> None:
    first = split_rows(iris, IRIS_CONFIG)
    second = split_rows(iris.copy(), IRIS_CONFIG)

    assert first == second


def test_a_different_seed_gives_a_different_split(iris: pd.DataFrame) -> None:
    other = parse_config(IRIS_YAML.replace("seed: 42", "seed: 7"))

    assert split_rows(iris, other).holdout != split_rows(iris, IRIS_CONFIG).holdout


def test_train_and_holdout_are_disjoint_and_cover_every_row(iris: pd.DataFrame) -> None:
    split = split_rows(iris, IRIS_CONFIG)

    assert set(split.train).isdisjoint(split.holdout)
    assert sorted(split.train + split.holdout) == list(range(len(iris)))
    assert len(split.holdout) == 30
    assert split.train == sorted(split.train) and split.holdout == sorted(split.holdout)


def test_a_stratified_split_keeps_class_proportions(iris: pd.DataFrame) -> None:
    split = split_rows(iris, IRIS_CONFIG)

    holdout_counts = iris["species"].iloc[split.holdout].value_counts().to_dict()

    assert split.stratified is True
    assert holdout_counts == {"setosa": 10, "versicolor": 10, "virginica": 10}


def test_a_class_with_one_row_falls_back_to_an_unstratified_split(iris: pd.DataFrame) -> None:
    frame = iris.copy()
    frame.loc[0, "species"] = "singleton"

    split = split_rows(frame, IRIS_CONFIG)

    assert split.stratified is False
    assert sorted(split.train + split.holdout) == list(range(len(frame)))
    assert len(split.holdout) == 30


def test_a_split_survives_its_json_form(iris: pd.DataFrame) -> None:
    split = split_rows(iris, IRIS_CONFIG)

    assert Split.from_json(split.to_json()) == split


def test_too_few_rows_to_split_is_permanent() -> None:
    frame = pd.DataFrame({"x": [1, 2], "label": ["a", "b"]})

    with pytest.raises(PermanentError) as caught:
        split_rows(frame, _config())

    assert caught.value.reason == "too_few_rows"
