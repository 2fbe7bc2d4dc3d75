"""Settings come from the environment; a missing one is named at start-up."""

from __future__ import annotations

import os

import pytest

from mlpipe.runtime.settings import CommonSettings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the shell or the local stack."""
    for name in list(os.environ):
        if name.startswith("MLPIPE_") or name in ("GOOGLE_CLOUD_PROJECT", "PORT"):
            monkeypatch.delenv(name)


def test_missing_required_settings_are_named() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(CommonSettings)

    assert "missing required setting MLPIPE_BUCKET" in str(caught.value)
    assert "missing required setting MLPIPE_PROJECT" in str(caught.value)
    assert str(caught.value).startswith("CommonSettings: ")


def test_only_the_missing_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", "p")

    with pytest.raises(SettingsError) as caught:
        load_settings(CommonSettings)

    assert "MLPIPE_BUCKET" in str(caught.value)
    assert "PROJECT" not in str(caught.value)


def test_settings_are_read_with_the_prefix_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", "my-project")
    monkeypatch.setenv("MLPIPE_BUCKET", "my-bucket")
    monkeypatch.setenv("MLPIPE_CODE_VERSION", "abc123")

    settings = load_settings(CommonSettings)

    assert settings.project == "my-project"
    assert settings.bucket == "my-bucket"
    assert settings.code_version == "abc123"
    assert settings.env == "local"
    assert settings.port == 8080


def test_google_cloud_project_is_an_alias_for_the_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "from-gcloud")
    monkeypatch.setenv("MLPIPE_BUCKET", "b")

    assert load_settings(CommonSettings).project == "from-gcloud"


def test_the_mlpipe_project_wins_over_the_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "from-gcloud")
    monkeypatch.setenv("MLPIPE_PROJECT", "explicit")
    monkeypatch.setenv("MLPIPE_BUCKET", "b")

    assert load_settings(CommonSettings).project == "explicit"


def test_cloud_runs_port_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", "p")
    monkeypatch.setenv("MLPIPE_BUCKET", "b")
    monkeypatch.setenv("PORT", "9090")

    assert load_settings(CommonSettings).port == 9090


def test_an_invalid_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", "p")
    monkeypatch.setenv("MLPIPE_BUCKET", "b")
    monkeypatch.setenv("PORT", "eighty")

    with pytest.raises(SettingsError, match="invalid setting PORT"):
        load_settings(CommonSettings)
