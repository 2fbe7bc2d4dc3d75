"""Pipeline config parsing: strict validation with errors that name the key, and hashing."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlpipe.ml.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]
IRIS = (REPO / "examples/iris/pipeline.yaml").read_text()

MINIMAL = """\
name: demo
dataset:
  target: label
model:
  name: demo-model
"""


def test_the_iris_example_parses() -> None:
    config = parse_config(IRIS)

    assert config.name == "iris"
    assert config.dataset.target == "species"
    assert config.dataset.min_rows == 30
    assert config.model.estimator == "sklearn.ensemble.RandomForestClassifier"
    assert config.model.params == {"n_estimators": 100, "random_state": 0, "n_jobs": 1}
    assert config.split.holdout_fraction == 0.2
    assert config.gates.min_accuracy == 0.75
    assert config.gates.min_per_class_f1 == 0.70


def test_omitted_sections_take_their_defaults() -> None:
    config = parse_config(MINIMAL)

    assert config.model.task == "classification"
    assert config.split.seed == 42
    assert config.training.backend == "local"
    assert config.gates.min_accuracy is None


def test_an_unknown_top_level_key_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + "schedule: daily\n", source="pipelines/demo/config.yaml")

    assert "pipelines/demo/config.yaml" in str(caught.value)
    assert "schedule: unknown key" in str(caught.value)


def test_an_unknown_nested_key_is_named_with_its_path() -> None:
    text = MINIMAL.replace("  name: demo-model\n", "  name: demo-model\n  paramz: {}\n")

    with pytest.raises(ConfigError, match=r"model\.paramz: unknown key"):
        parse_config(text)


def test_every_unknown_key_is_reported_at_once() -> None:
    text = MINIMAL + "schedule: daily\n" + "split:\n  sead: 1\n"

    with pytest.raises(ConfigError) as caught:
        parse_config(text)

    assert "schedule: unknown key" in str(caught.value)
    assert "split.sead: unknown key" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (MINIMAL.replace("  target: label\n", "  min_rows: 5\n"), "dataset.target"),
        ("name: demo\ndataset:\n  target: label\n", "model"),
        (MINIMAL.replace("name: demo\n", ""), "name"),
    ],
)
def test_a_missing_required_field_is_named(text: str, path: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?<![\w.]){path}: required field missing"):
        parse_config(text)


@pytest.mark.parametrize(
    ("addition", "path"),
    [
        ("split:\n  seed: not-a-number\n", "split.seed"),
        ("split:\n  holdout_fraction: 1.5\n", "split.holdout_fraction"),
        ("gates:\n  min_accuracy: high\n", "gates.min_accuracy"),
        ("training:\n  backend: kubernetes\n", "training.backend"),
    ],
)
def test_a_wrong_type_or_value_is_named(addition: str, path: str) -> None:
    with pytest.raises(ConfigError, match=rf"{path}: "):
        parse_config(MINIMAL + addition)


@pytest.mark.parametrize(
    "estimator",
    ["os.system", "xgboost.XGBClassifier", "sklearn", "sklearn.ensemble.RandomForest; rm -rf /"],
)
def test_an_estimator_outside_scikit_learn_is_refused(estimator: str) -> None:
    text = MINIMAL + f"  estimator: {estimator!r}\n"

    with pytest.raises(ConfigError, match=r"model\.estimator: .*inside scikit-learn"):
        parse_config(text)


def test_an_estimator_inside_scikit_learn_is_accepted() -> None:
    config = parse_config(MINIMAL + "  estimator: sklearn.linear_model.LogisticRegression\n")

    assert config.model.estimator == "sklearn.linear_model.LogisticRegression"


@pytest.mark.parametrize("text", ["name: [unclosed\n", "a: b\n  c: d\n", "key: 'open\n"])
def test_invalid_yaml_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config(text, source="upload.yaml")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_a_document_that_is_not_a_mapping_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        parse_config(text)


def test_the_hash_does_not_depend_on_key_order() -> None:
    reordered = """\
gates: {min_per_class_f1: 0.70, min_accuracy: 0.75}
model:
  params: {n_jobs: 1, random_state: 0, n_estimators: 100}
  estimator: sklearn.ensemble.RandomForestClassifier
  task: classification
  name: iris-classifier
split: {stratify: true, seed: 42, holdout_fraction: 0.2}
dataset:
  min_rows: 30
  features: [sepal_length, sepal_width, petal_length, petal_width]
  target: species
name: iris
"""

    assert parse_config(reordered).sha256() == parse_config(IRIS).sha256()


def test_spelling_out_a_default_does_not_change_the_hash() -> None:
    explicit = MINIMAL + "split:\n  seed: 42\n  holdout_fraction: 0.2\n"

    assert parse_config(explicit).sha256() == parse_config(MINIMAL).sha256()


def test_changing_a_param_changes_the_hash() -> None:
    changed = IRIS.replace("n_estimators: 100", "n_estimators: 101")

    original = parse_config(IRIS).sha256()
    assert parse_config(changed).sha256() != original
    assert len(original) == 64 and set(original) <= set("0123456789abcdef")


def test_explicit_features_are_used_as_given() -> None:
    config = parse_config(IRIS)

    columns = config.feature_columns(["species", "petal_width", "extra", "sepal_length"])

    assert columns == ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def test_without_features_every_other_column_is_a_feature_in_file_order() -> None:
    text = MINIMAL.replace("  target: label\n", "  target: label\n  exclude: [row_id]\n")
    config = parse_config(text)

    columns = config.feature_columns(["row_id", "b", "label", "a"])

    assert columns == ["b", "a"]


def test_declared_datetime_columns_are_not_features() -> None:
    text = MINIMAL.replace("  target: label\n", "  target: label\n  columns: {when: datetime}\n")
    config = parse_config(text)

    assert config.feature_columns(["when", "x", "label"]) == ["x"]


def test_features_may_not_include_the_target() -> None:
    text = MINIMAL.replace("  target: label\n", "  target: label\n  features: [x, label]\n")

    with pytest.raises(ConfigError, match=r"dataset\.features includes the target 'label'"):
        parse_config(text)


def test_monitoring_settings_do_not_change_the_config_hash() -> None:
    text = (REPO / "examples/bikeshare/pipeline.yaml").read_text()
    config = parse_config(text)
    tuned = parse_config(text.replace("psi_threshold: 0.2", "psi_threshold: 0.3"))
    assert tuned.monitoring.psi_threshold == 0.3
    assert tuned.sha256() == config.sha256()
    assert "monitoring" not in config.canonical_json().decode()
