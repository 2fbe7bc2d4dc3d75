"""Service settings: one pydantic Settings class per service, all built on `CommonSettings`.

Every setting is read from the environment with the `MLPIPE_` prefix (for example
`MLPIPE_BUCKET`). A missing required setting stops start-up with a message naming it.
"""

from __future__ import annotations

import os
from typing import Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from mlpipe import tracing


class SettingsError(RuntimeError):
    """A required setting is missing or has a wrong value."""


class CommonSettings(BaseSettings):
    """Settings every mlpipe process needs."""

    model_config = SettingsConfigDict(env_prefix="MLPIPE_", extra="ignore", frozen=True)

    project: str = Field(
        validation_alias=AliasChoices("MLPIPE_PROJECT", "GOOGLE_CLOUD_PROJECT"),
        description="GCP project that owns the topics (any id works on the emulator).",
    )
    bucket: str = Field(description="Bucket holding datasets, runs, registry and quarantine.")
    code_version: str = Field(default="dev", description="git commit of the running code.")
    env: str = Field(default="local", description="Environment whose config overrides apply.")
    log_level: str = "INFO"
    # Cloud Run sets PORT; the container must listen on all interfaces there. The local
    # stack sets MLPIPE_HOST=127.0.0.1.
    host: str = "0.0.0.0"
    port: int = Field(default=8080, validation_alias=AliasChoices("PORT", "MLPIPE_PORT"))
    publish_timeout_seconds: float = 30.0
    # Push authentication (mlpipe.runtime.auth): "oidc" checks Pub/Sub's token on every push; "none"
    # is for the emulators and refuses to start when they are not configured.
    push_auth: Literal["oidc", "none"] = "oidc"
    push_audience: str = Field(default="", description="This service's URL (the audience).")
    push_service_account: str = Field(
        default="", description="The push subscription's service account email."
    )
    push_certs_url: str = "https://www.googleapis.com/oauth2/v1/certs"
    # A Pub/Sub message is at most 10 MB; its base64 push envelope about 13.4 MB.
    max_push_bytes: int = Field(default=14_000_000, ge=1024)
    # Tracing (mlpipe.tracing): "off", "file" (JSON lines under trace_dir, the local
    # stack) or "cloud-trace" (Cloud Trace; trace_endpoint=http://… for a local stand-in).
    trace_exporter: Literal["off", "file", "cloud-trace"] = "off"
    trace_dir: str = ""
    trace_endpoint: str = ""
    # Cost estimates of runs and batches (mlpipe.store.run_cost): compact JSON that the deploy
    # writes from infra/runtime.yaml and infra/prices.yaml for the services that estimate
    # (mlpipe_ops.service_runtime.cost_environment); empty elsewhere.
    cost_sizes: str = Field(default="", description="Every service's cpu and memory, as JSON.")
    prices: str = Field(default="", description="The price table (infra/prices.yaml), as JSON.")

    def start_tracing(self, process: str) -> bool:
        """Send this process's spans where trace_exporter says (mlpipe.tracing.configure);
        whether tracing is on. TracingError names a setting that cannot work."""
        return tracing.configure(
            process,
            self.trace_exporter,
            project=self.project,
            directory=self.trace_dir,
            endpoint=self.trace_endpoint,
        )

    @property
    def receives_push(self) -> bool:
        """Whether Pub/Sub pushes reach this process (so their tokens must be checked)."""
        return True


S = TypeVar("S", bound=BaseSettings)


def _alias_set(cls: type[BaseSettings], name: str) -> str:
    """The variable actually set among the alias choices that include `name` (pydantic names
    the first choice, e.g. AIP_HTTP_PORT when PORT was given)."""
    for info in cls.model_fields.values():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            choices = [c for c in alias.choices if isinstance(c, str)]
            if name in choices:
                return next((c for c in choices if c in os.environ), name)
    return name


def load_settings(cls: type[S]) -> S:
    """Build `cls` from the environment, turning validation errors into a clear message."""
    try:
        return cls()
    except ValidationError as exc:
        problems = []
        prefix = str(cls.model_config.get("env_prefix", ""))
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "?"
            env_name = name if name.isupper() else f"{prefix}{name}".upper()
            env_name = _alias_set(cls, env_name)
            if err["type"] == "missing":
                problems.append(f"missing required setting {env_name}")
            else:
                problems.append(f"invalid setting {env_name}: {err['msg']}")
        raise SettingsError(f"{cls.__name__}: " + "; ".join(problems)) from None
