"""Who is at the keyboard, for the records a command leaves (approval requests, decisions,
promotions): `--as NAME`, else MLPIPE_ACTOR, else the active gcloud account, else the
operating system's user; and where the name came from.

A name, not a proof: anyone may pass `--as`. What a person may actually do is their IAM on the
target environment's bucket and topics (docs/promotion.md).
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from collections.abc import Mapping

from mlpipe.store.approvals import Actor

ACTOR_VARIABLE = "MLPIPE_ACTOR"
# gcloud prints this for a property that is not set (on stderr in recent versions).
UNSET = "(unset)"


def gcloud_account(command: str = "gcloud", timeout: float = 20.0) -> str:
    """The active account of the gcloud CLI (`gcloud config get-value account`), or "" when
    gcloud is not installed, answers nothing or fails."""
    path = shutil.which(command)
    if path is None:
        return ""
    try:
        done = subprocess.run(
            [path, "config", "get-value", "account"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    value = done.stdout.strip().splitlines()[-1].strip() if done.stdout.strip() else ""
    return "" if done.returncode != 0 or value in ("", UNSET) else value


def os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid (a container's arbitrary user)
        return f"uid-{os.getuid()}"


def resolve_actor(
    explicit: str | None = None,
    environ: Mapping[str, str] | None = None,
    gcloud: str = "gcloud",
) -> Actor:
    """The acting person's name and its source: "--as", "MLPIPE_ACTOR", "gcloud", "os-user"."""
    if explicit and explicit.strip():
        return Actor(explicit.strip(), "--as")
    variables = os.environ if environ is None else environ
    if variables.get(ACTOR_VARIABLE, "").strip():
        return Actor(variables[ACTOR_VARIABLE].strip(), ACTOR_VARIABLE)
    account = gcloud_account(gcloud)
    if account:
        return Actor(account, "gcloud")
    return Actor(os_user(), "os-user")
