"""One pipeline config, several environments: overrides, and the errors they can cause."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlpipe.ml.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]
BIKESHARE = (REPO / "examples/bikeshare/pipeline.yaml").read_text()


def test_an_environment_overrides_only_what_it_names() -> None:
    base = parse_config(BIKESHARE)
    prod = parse_config(BIKESHARE, env="prod")

    assert base.gates.min_r2 == 0.6 and prod.gates.min_r2 == 0.75
    assert prod.gates.max_rmse == base.gates.max_rmse
    assert prod.model == base.model
    assert prod.sha256() != base.sha256()  # a different config is a different run


def test_an_unknown_environment_uses_the_base() -> None:
    assert parse_config(BIKESHARE, env="staging") == parse_config(BIKESHARE)


def test_an_override_with_an_unknown_key_is_named() -> None:
    text = BIKESHARE + "  dev:\n    gates:\n      min_rsquared: 0.1\n"

    with pytest.raises(ConfigError, match=r"gates\.min_rsquared: unknown key"):
        parse_config(text, env="dev")


def test_the_name_cannot_be_overridden() -> None:
    with pytest.raises(ConfigError, match="cannot be overridden"):
        parse_config(BIKESHARE + "  dev:\n    name: other\n", env="dev")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("  time_column: timestamp\n", ""), "needs split.time_column"),
        (("max_rmse: 1.5", "max_rmse: 1.5\n  min_accuracy: 0.5"), "do not apply to regression"),
        (("metric: rmse", "metric: loss"), "unknown metric 'loss'"),
        (("station: categorical", "station: text"), "dataset.columns.station"),
    ],
)
def test_inconsistent_configs_are_refused(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(BIKESHARE.replace(*edit))


def test_all_but_features_skip_the_target_excluded_and_datetime_columns() -> None:
    config = parse_config(BIKESHARE)
    columns = [
        "timestamp",
        "station",
        "station_kind",
        "hour",
        "weekday",
        "temperature_c",
        "precipitation_mm",
        "wind_kmh",
        "net_change",
    ]

    assert config.feature_columns(columns) == [
        "station",
        "station_kind",
        "hour",
        "weekday",
        "temperature_c",
        "precipitation_mm",
        "wind_kmh",
    ]
