"""The console's settings (MLPIPE_* environment variables): who may act, how callers are
identified, where the deployer is."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mlpipe.runtime.settings import CommonSettings


class ConsoleSettings(CommonSettings):
    # How a caller's identity is known:
    #   iap       Identity-Aware Proxy in front: its X-Goog-Authenticated-User-Email header
    #   id_token  a Google ID token for this service (Authorization: Bearer), verified here
    #   local     everyone is "local" and may act; only with the emulators
    console_auth: Literal["iap", "id_token", "local"] = Field(
        default="id_token", description="iap, id_token or local (emulators only)."
    )
    console_audience: str = Field(
        default="", description="This service's URL: the audience of an ID token (id_token)."
    )
    console_iap_audience: str = Field(
        default="",
        description="IAP's signed header JWT audience: set, IAP's signed assertion is checked "
        "instead of trusting its email header.",
    )
    console_iap_certs_url: str = "https://www.gstatic.com/iap/verify/public_key"
    console_actors: str = Field(
        default="",
        description="Who may promote, roll back and replay: comma-separated emails, "
        "'domain:example.com' for a whole domain, 'group:team@example.com' for the members of "
        "a Google group (asked of Cloud Identity). Everyone else only reads.",
    )
    console_groups_url: str = Field(
        default="",
        description="Cloud Identity's URL for the group: entries: empty, the real API (the "
        "default credentials); a local URL, a stand-in asked anonymously.",
    )
    console_groups_cache_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How long Cloud Identity's answer (is this caller in that group) is kept.",
    )
    deployer_url: str = Field(
        default="", description="The deployer's URL: promote and rollback are its routes."
    )
    page_size: int = Field(default=50, ge=1, le=500)
    read_workers: int = Field(
        default=8, ge=1, le=64, description="Run records read at once when a page needs them."
    )

    @property
    def receives_push(self) -> bool:
        return False

    @model_validator(mode="after")
    def _auth_settings(self) -> ConsoleSettings:
        if self.console_auth == "id_token" and not self.console_audience:
            raise ValueError("MLPIPE_CONSOLE_AUTH=id_token needs MLPIPE_CONSOLE_AUDIENCE")
        return self

    def actors(self) -> frozenset[str]:
        return frozenset(a.strip().lower() for a in self.console_actors.split(",") if a.strip())
