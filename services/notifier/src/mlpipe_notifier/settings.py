"""The notifier's settings: where notices go and how long a channel may take (MLPIPE_*
environment variables)."""

from __future__ import annotations

import os
import urllib.parse
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from mlpipe.runtime.settings import CommonSettings
from mlpipe_notifier.channels import Channel, parse_channels


class NotifierSettings(CommonSettings):
    # Read as text and parsed here (not by pydantic-settings' JSON decoding), so that a bad
    # entry is named `MLPIPE_NOTIFY_CHANNELS[i].key`; see mlpipe_notifier.channels.
    notify_channels: Annotated[tuple[Channel, ...], NoDecode] = Field(
        default=(),
        description="JSON list of channels (name, kind slack|webhook, url, events, secret_env); "
        "none: every notice is logged instead.",
    )
    console_url: str = Field(
        default="", description="The console's base URL: notices link to <console>/runs/<id>."
    )
    notify_connect_timeout_seconds: float = Field(default=2.0, gt=0)
    notify_timeout_seconds: float = Field(
        default=5.0, gt=0, description="A post that has not been answered by then is retried."
    )
    notify_claim_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A delivery's claim on a notice older than this (its instance died while "
        "posting) is taken over by the next delivery.",
    )

    @field_validator("notify_channels", mode="before")
    @classmethod
    def _channels(cls, value: Any) -> Any:
        # The webhooks' secrets are variables of their own, named by each channel.
        return parse_channels(value, os.environ) if isinstance(value, str) else value

    @field_validator("console_url")
    @classmethod
    def _console(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(f"must be an http:// or https:// URL, not {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _lease_outlasts_a_post(self) -> NotifierSettings:
        if self.notify_claim_lease_seconds <= self.notify_timeout_seconds:
            raise ValueError(
                "MLPIPE_NOTIFY_CLAIM_LEASE_SECONDS must exceed MLPIPE_NOTIFY_TIMEOUT_SECONDS "
                "(a claim must outlive the post it covers)"
            )
        return self
