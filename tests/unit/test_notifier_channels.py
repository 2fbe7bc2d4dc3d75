"""MLPIPE_NOTIFY_CHANNELS: what a valid list gives, and the message naming each mistake."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mlpipe.runtime.settings import SettingsError, load_settings
from mlpipe_notifier.channels import ChannelConfigError, parse_channels
from mlpipe_notifier.notices import NoticeKind
from mlpipe_notifier.settings import NotifierSettings

SLACK = {"name": "ml-team", "kind": "slack", "url": "https://hooks.slack.com/services/T/B/x"}
HOOK = {
    "name": "audit",
    "kind": "webhook",
    "url": "http://127.0.0.1:9/hook",
    "secret_env": "AUDIT_SECRET",
    "events": ["failure", "canary"],
}
ENV = {"AUDIT_SECRET": "s3cret"}


def parse(entries: Any, env: dict[str, str] | None = None) -> Any:
    text = entries if isinstance(entries, str) else json.dumps(entries)
    return parse_channels(text, ENV if env is None else env)


def test_a_slack_and_a_webhook_channel() -> None:
    slack, hook = parse([SLACK, HOOK])

    assert (slack.name, slack.kind, slack.url) == ("ml-team", "slack", SLACK["url"])
    assert slack.events == frozenset(NoticeKind)  # every kind when `events` is absent
    assert slack.secret == ""
    assert (hook.kind, hook.secret_env, hook.secret) == ("webhook", "AUDIT_SECRET", "s3cret")
    assert hook.events == {NoticeKind.FAILURE, NoticeKind.CANARY}
    assert hook.takes(NoticeKind.CANARY) and not hook.takes(NoticeKind.DRIFT)


def test_no_setting_is_no_channel() -> None:
    assert parse("") == ()
    assert parse("  ") == ()
    assert parse([]) == ()


def test_neither_the_url_nor_the_secret_is_shown() -> None:
    slack, hook = parse([SLACK, HOOK])

    shown = repr((slack, hook)) + slack.describe() + hook.describe()

    assert "services/T/B/x" not in shown and "s3cret" not in shown
    assert (
        slack.describe()
        == "ml-team (slack to hooks.slack.com: failure, gate_blocked, drift, canary, approval)"
    )
    assert hook.describe() == "audit (webhook to 127.0.0.1: failure, canary)"


@pytest.mark.parametrize(
    ("entries", "env", "message"),
    [
        ("[{", ENV, "MLPIPE_NOTIFY_CHANNELS: not JSON: "),
        (
            '{"name": "x"}',
            ENV,
            "MLPIPE_NOTIFY_CHANNELS: expected a JSON list of channels, got dict",
        ),
        (["slack"], ENV, "MLPIPE_NOTIFY_CHANNELS[0]: expected an object, got str"),
        (
            [{**SLACK, "kind": "teams"}],
            ENV,
            "MLPIPE_NOTIFY_CHANNELS[0].kind: must be slack or webhook, not 'teams'",
        ),
        ([SLACK, {"name": "b", "kind": "slack"}], ENV, "MLPIPE_NOTIFY_CHANNELS[1].url: required"),
        (
            [SLACK, {**SLACK, "name": "b", "url": "ftp://example.com/x"}],
            ENV,
            "MLPIPE_NOTIFY_CHANNELS[1].url: must be an http:// or https:// URL with a host, not a "
            "ftp: one",
        ),
        ([{**SLACK, "url": "https:///x"}], ENV, "MLPIPE_NOTIFY_CHANNELS[0].url: must be an http"),
        (
            [SLACK, SLACK],
            ENV,
            "MLPIPE_NOTIFY_CHANNELS[1].name: 'ml-team' is already the name of [0]",
        ),
        ([{**SLACK, "name": "../up"}], ENV, "MLPIPE_NOTIFY_CHANNELS[0].name: '../up': use 1-64"),
        (
            [{**SLACK, "events": ["failure", "approvals"]}],
            ENV,
            "MLPIPE_NOTIFY_CHANNELS[0].events[1]: 'approvals' is not a notice kind (one of "
            "failure, gate_blocked, drift, canary, approval)",
        ),
        ([{**SLACK, "events": []}], ENV, "MLPIPE_NOTIFY_CHANNELS[0].events: empty"),
        ([{**SLACK, "colour": "red"}], ENV, "MLPIPE_NOTIFY_CHANNELS[0].colour: unknown key"),
        (
            [{**HOOK, "secret_env": ""}],
            ENV,
            "MLPIPE_NOTIFY_CHANNELS[0].secret_env: required for a webhook",
        ),
        ([HOOK], {}, "MLPIPE_NOTIFY_CHANNELS[0].secret_env: AUDIT_SECRET is not set"),
        (
            [HOOK],
            {"AUDIT_SECRET": ""},
            "MLPIPE_NOTIFY_CHANNELS[0].secret_env: AUDIT_SECRET is empty",
        ),
        (
            [{**SLACK, "secret_env": "AUDIT_SECRET"}],
            ENV,
            "MLPIPE_NOTIFY_CHANNELS[0].secret_env: only webhook channels are signed",
        ),
    ],
)
def test_a_mistake_is_named_with_its_entry(entries: Any, env: dict[str, str], message: str) -> None:
    with pytest.raises(ChannelConfigError) as raised:
        parse(entries, env)

    assert str(raised.value).startswith(message), str(raised.value)


def test_every_mistake_is_named_at_once() -> None:
    with pytest.raises(ChannelConfigError) as raised:
        parse([{"name": "a", "kind": "slack"}, {**HOOK, "url": "mailto:x"}], {})

    said = str(raised.value)
    assert "MLPIPE_NOTIFY_CHANNELS[0].url: required" in said
    assert "MLPIPE_NOTIFY_CHANNELS[1].url: must be an http" in said
    assert "mailto" not in said.split("not a ")[0]  # never the URL itself


def settings_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", "p")
    monkeypatch.setenv("MLPIPE_BUCKET", "b")
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_the_settings_read_the_channels_and_the_console(monkeypatch: pytest.MonkeyPatch) -> None:
    settings_env(
        monkeypatch,
        MLPIPE_NOTIFY_CHANNELS=json.dumps([SLACK, HOOK]),
        AUDIT_SECRET="s3cret",
        MLPIPE_CONSOLE_URL="https://console.example.com/",
    )

    settings = load_settings(NotifierSettings)

    assert [c.name for c in settings.notify_channels] == ["ml-team", "audit"]
    assert settings.notify_channels[1].secret == "s3cret"
    assert settings.console_url == "https://console.example.com"
    assert (settings.notify_connect_timeout_seconds, settings.notify_timeout_seconds) == (2, 5)


def test_a_bad_channel_stops_the_start_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    settings_env(
        monkeypatch, MLPIPE_NOTIFY_CHANNELS=json.dumps([SLACK, {**SLACK, "name": "b", "url": ""}])
    )

    with pytest.raises(SettingsError, match=r"MLPIPE_NOTIFY_CHANNELS\[1\]\.url: must be an http"):
        load_settings(NotifierSettings)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"MLPIPE_CONSOLE_URL": "console.example.com"}, "invalid setting MLPIPE_CONSOLE_URL"),
        (
            {"MLPIPE_NOTIFY_CLAIM_LEASE_SECONDS": "5"},
            "MLPIPE_NOTIFY_CLAIM_LEASE_SECONDS must exceed MLPIPE_NOTIFY_TIMEOUT_SECONDS",
        ),
    ],
)
def test_other_bad_settings(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, str], message: str
) -> None:
    settings_env(monkeypatch, **values)

    with pytest.raises(SettingsError, match=message):
        load_settings(NotifierSettings)
