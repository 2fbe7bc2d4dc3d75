"""Where notices go: the channels of MLPIPE_NOTIFY_CHANNELS, read and checked at start-up.

The setting is a JSON list; each entry is one channel:

    {"name": "ml-team", "kind": "slack", "url": "https://hooks.slack.com/services/…",
     "events": ["failure", "gate_blocked"]}
    {"name": "audit", "kind": "webhook", "url": "https://audit.example.com/mlpipe",
     "secret_env": "MLPIPE_AUDIT_HOOK_SECRET"}

`events` is a subset of the notice kinds (all of them when absent). A webhook's requests are
signed with the secret held by the variable `secret_env` names (on Cloud Run, a Secret Manager
secret mounted as that variable). Anything wrong stops the service before it serves, naming
the setting and the entry: `MLPIPE_NOTIFY_CHANNELS[1].url: …`.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mlpipe.store.layout import NOTIFICATION_NAME
from mlpipe_notifier.notices import NoticeKind

SETTING = "MLPIPE_NOTIFY_CHANNELS"


@dataclass(frozen=True)
class Channel:
    name: str
    kind: Literal["slack", "webhook"]
    url: str = field(repr=False)  # a Slack webhook's URL is itself a credential: never logged
    events: frozenset[NoticeKind]
    secret_env: str = ""
    secret: str = field(default="", repr=False)

    def takes(self, kind: NoticeKind) -> bool:
        return kind in self.events

    def describe(self) -> str:
        """For logs: the name, kind, host and notice kinds; never the URL's path or secret."""
        host = urllib.parse.urlsplit(self.url).hostname or "?"
        kinds = ", ".join(k.value for k in NoticeKind if k in self.events)
        return f"{self.name} ({self.kind} to {host}: {kinds})"


class ChannelConfigError(ValueError):
    """MLPIPE_NOTIFY_CHANNELS is not a valid list of channels; the message names each entry."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["slack", "webhook"]
    url: str
    events: tuple[NoticeKind, ...] = tuple(NoticeKind)
    secret_env: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # It names the channel's records (notifications/<name>/…).
        if not NOTIFICATION_NAME.match(value) or ".." in value or len(value) > 64:
            raise ValueError(
                f"{value!r}: use 1-64 letters, digits, '_', '.', '=' or '-', starting with a "
                "letter or digit"
            )
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Not the URL itself: it may be a credential.
            scheme = f"{parts.scheme}:" if parts.scheme else "schemeless"
            raise ValueError(f"must be an http:// or https:// URL with a host, not a {scheme} one")
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: tuple[NoticeKind, ...]) -> tuple[NoticeKind, ...]:
        if not value:
            raise ValueError(f"empty: list some of {', '.join(k.value for k in NoticeKind)}")
        return value


def _problem(error: Any) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "required"
    elif error["type"] == "extra_forbidden":
        message = "unknown key (known: name, kind, url, events, secret_env)"
    elif error["type"] == "literal_error":  # the kind
        message = f"must be slack or webhook, not {error['input']!r}"
    elif error["type"] == "enum":
        message = f"{error['input']!r} is not a notice kind (one of {', '.join(NoticeKind)})"
    return f"{where}: {message}"


def _entry(index: int, raw: Any, env: Mapping[str, str]) -> tuple[Channel | None, list[str]]:
    """Entry `index` as a channel, or the problems with it (each as `[index].key: what`)."""
    if not isinstance(raw, dict):
        return None, [f"[{index}]: expected an object, got {type(raw).__name__}"]
    try:
        entry = _Entry.model_validate(raw)
    except ValidationError as exc:
        return None, [f"[{index}]{_problem(e)}" for e in exc.errors()]
    secret = ""
    if entry.kind == "slack" and entry.secret_env:
        return None, [f"[{index}].secret_env: only webhook channels are signed"]
    if entry.kind == "webhook":
        if not entry.secret_env:
            return None, [
                f"[{index}].secret_env: required for a webhook (it names the variable "
                "holding the signing secret)"
            ]
        secret = env.get(entry.secret_env, "")
        if not secret:
            state = "empty" if entry.secret_env in env else "not set"
            return None, [f"[{index}].secret_env: {entry.secret_env} is {state}"]
    channel = Channel(
        name=entry.name,
        kind=entry.kind,
        url=entry.url,
        events=frozenset(entry.events),
        secret_env=entry.secret_env,
        secret=secret,
    )
    return channel, []


def parse_channels(text: str, env: Mapping[str, str]) -> tuple[Channel, ...]:
    """The channels `text` (the setting's JSON) lists; `env` holds the webhooks' secrets.
    An empty setting is no channel. ChannelConfigError names every problem found."""
    if not text.strip():
        return ()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChannelConfigError(f"{SETTING}: not JSON: {exc}") from None
    if not isinstance(raw, list):
        raise ChannelConfigError(
            f"{SETTING}: expected a JSON list of channels, got {type(raw).__name__}"
        )
    channels: list[Channel] = []
    problems: list[str] = []
    first: dict[str, int] = {}
    for index, item in enumerate(raw):
        channel, found = _entry(index, item, env)
        problems += found
        if channel is None:
            continue
        if channel.name in first:
            problems.append(
                f"[{index}].name: {channel.name!r} is already the name of [{first[channel.name]}]"
            )
            continue
        first[channel.name] = index
        channels.append(channel)
    if problems:
        raise ChannelConfigError("; ".join(f"{SETTING}{p}" for p in problems))
    return tuple(channels)
