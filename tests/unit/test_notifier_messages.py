"""A notice as each kind of channel receives it, the webhook's signature (checked with the recipe
docs/notifications.md gives receivers), and what a channel's answer means."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from mlpipe_notifier.channels import Channel
from mlpipe_notifier.messages import outgoing, signature, slack_text, webhook_body
from mlpipe_notifier.notices import NoticeKind, canary_notice, drift_notice, failure_notice
from mlpipe_notifier.posting import Result, classify
from tests import notifier_samples as sample

CONSOLE = "https://console.example.com"
SLACK = Channel("team", "slack", "https://hooks.slack.com/services/T/B/x", frozenset(NoticeKind))
HOOK = Channel(
    "audit", "webhook", "https://audit.example.com/in", frozenset(NoticeKind), "S", "s3cret"
)


@pytest.fixture(scope="module")
def verify() -> Callable[..., bool]:
    return sample.documented_verify()


def test_the_slack_text_of_a_failure() -> None:
    text = slack_text(failure_notice(sample.failed(), CONSOLE))

    assert text.splitlines() == [
        f":x: iris run {sample.RUN} failed in trainer: missing_column",
        "column 'species' is missing from datasets/iris/dt=2026-11-23/upload-1.csv",
        "input kept at gs://b/quarantine/missing_column/trainer-4242",
        f"<{CONSOLE}/runs/{sample.RUN}|run {sample.RUN}>",
    ]


def test_slack_markup_in_a_notice_is_shown_as_text() -> None:
    failed = sample.failed()
    failed.message = "a <b> & <!channel>"

    text = slack_text(failure_notice(failed, ""))

    assert "a &lt;b&gt; &amp; &lt;!channel&gt;" in text
    assert "<!channel>" not in text


@pytest.mark.parametrize(
    ("event", "emoji"),
    [
        (sample.deployed("canary"), ":hatching_chick:"),
        (sample.deployed("promote", requested_by="predictor"), ":rocket:"),
        (sample.deployed("rollback", version=3, previous=4, requested_by="cli"), ":rewind:"),
    ],
)
def test_each_canary_milestone_has_its_emoji(event: Any, emoji: str) -> None:
    notice = canary_notice(event, CONSOLE)

    assert notice is not None
    assert slack_text(notice).startswith(f"{emoji} iris-classifier ")
    assert slack_text(notice).endswith(f"<{CONSOLE}/models|models>")


def test_a_slack_post_is_the_text_with_the_idempotency_key() -> None:
    notice = drift_notice(sample.drifted(), CONSOLE)

    sent = outgoing(SLACK, notice, time.time(), "mlpipe-notifier/test")

    assert json.loads(sent.body) == {"text": slack_text(notice)}
    assert sent.headers == {
        "Content-Type": "application/json",
        "User-Agent": "mlpipe-notifier/test",
        "Idempotency-Key": notice.key,
    }


def test_the_webhook_body_has_every_field() -> None:
    notice = canary_notice(sample.deployed("canary"), CONSOLE)
    assert notice is not None

    sent = outgoing(HOOK, notice, 1_790_000_000, "ua")

    assert (
        json.loads(sent.body)
        == webhook_body(notice)
        == {
            "kind": "canary",
            "title": "iris-classifier v4 is a canary at 10% beside v3, waiting for promotion",
            "text": "promote: mlpipe promote iris-classifier · roll back: mlpipe rollback "
            "iris-classifier",
            "link": f"{CONSOLE}/models",
            "run_id": sample.RUN,
            "model": "iris-classifier",
            "version": 4,
            "stage": "",
            "reason": "",
            "milestone": "started",
            "occurred_at": "2026-11-23T09:30:00Z",
            "idempotency_key": "canary-iris-classifier-v4-started",
            "event_type": "mlpipe.v1.DeploymentCompleted",
        }
    )
    assert sent.headers["Idempotency-Key"] == "canary-iris-classifier-v4-started"
    assert sent.headers["X-Mlpipe-Timestamp"] == "1790000000"


def test_the_signature_verifies_with_the_documented_recipe(verify: Callable[..., bool]) -> None:
    sent = outgoing(HOOK, failure_notice(sample.failed(), CONSOLE), time.time(), "ua")

    assert sent.headers["X-Mlpipe-Signature"].startswith("v1=")
    assert verify("s3cret", sent.headers, sent.body)
    assert not verify("another secret", sent.headers, sent.body)
    assert not verify("s3cret", sent.headers, sent.body.replace(b"trainer", b"ingest"))
    assert not verify("s3cret", {**sent.headers, "X-Mlpipe-Timestamp": "1"}, sent.body)
    assert not verify("s3cret", {k: v for k, v in sent.headers.items() if "Mlpipe" not in k}, b"")


def test_an_old_request_is_refused(verify: Callable[..., bool]) -> None:
    """A request recorded and played again later: its signature is right, its time is not."""
    sent = outgoing(HOOK, failure_notice(sample.failed(), CONSOLE), time.time() - 600, "ua")

    assert not verify("s3cret", sent.headers, sent.body)
    assert verify("s3cret", sent.headers, sent.body, tolerance=900)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    # Computed independently: printf '1790000000.{}' | openssl dgst -sha256 -hmac s3cret
    expected = "v1=0d84afbca530158326e0549a7a1c3579755f9b8ba4cceba2c143dbe14147b60f"

    got = signature("s3cret", "1790000000", b"{}")

    assert re.fullmatch(r"v1=[0-9a-f]{64}", got)
    assert got == expected


@pytest.mark.parametrize(
    ("status", "result"),
    [
        (200, Result.SENT),
        (204, Result.SENT),
        (301, Result.TRANSIENT),  # not followed: the configured URL is the one trusted
        (400, Result.PERMANENT),
        (401, Result.PERMANENT),
        (404, Result.PERMANENT),
        (410, Result.PERMANENT),
        (408, Result.TRANSIENT),
        (429, Result.TRANSIENT),
        (500, Result.TRANSIENT),
        (503, Result.TRANSIENT),
    ],
)
def test_what_an_answer_means(status: int, result: Result) -> None:
    assert classify(status) is result
