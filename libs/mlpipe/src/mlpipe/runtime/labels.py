"""Labels on the cloud jobs and resources a run makes, so the billing export is attributable
per run (docs/cost.md): every CustomJob, Vertex AI model, Cloud Run revision, Dataflow job and
BigQuery job carries the run id, the pipeline and the environment.

Google's label rules (cloud.google.com/resource-manager/docs/labels-overview, "Requirements
for labels"): keys and values at most 63 characters; lowercase letters, numeric characters,
underscores and dashes; a key starts with a lowercase letter and is never empty; a value may
be empty. International characters are allowed there; these functions keep to ASCII, which
every service that takes labels accepts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MAX_LENGTH = 63
RUN_ID = "mlpipe-run-id"
PIPELINE = "mlpipe-pipeline"
ENV = "mlpipe-env"

_NOT_ALLOWED = re.compile(r"[^a-z0-9_-]")


def label_value(text: str) -> str:
    """`text` as a label value: lowercased, every other character a `-`, at most 63
    characters (a run id, a commit, a pipeline's name pass unchanged)."""
    return _NOT_ALLOWED.sub("-", str(text).lower())[:MAX_LENGTH]


def label_key(text: str) -> str:
    """`text` as a label key: a label value that starts with a lowercase letter (`k` is put
    before one that does not, so an empty text is `k`)."""
    value = label_value(text)
    if not value[:1].isalpha():
        value = ("k" + value)[:MAX_LENGTH]
    return value


def labels(values: Mapping[str, str]) -> dict[str, str]:
    """Every key and value sanitised; an empty value is dropped (it would say nothing)."""
    return {label_key(k): label_value(v) for k, v in values.items() if str(v)}


def run_labels(run_id: str, pipeline: str, env: str, **more: str) -> dict[str, str]:
    """The labels of a run's cloud jobs and resources: run id, pipeline, environment, then
    `more` (keys with `_` for `-`, e.g. mlpipe_commit=...)."""
    return labels(
        {RUN_ID: run_id, PIPELINE: pipeline, ENV: env}
        | {k.replace("_", "-"): v for k, v in more.items()}
    )
