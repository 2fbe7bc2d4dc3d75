"""A notice as each kind of channel receives it: the text of a Slack-compatible incoming
webhook, or the signed JSON body of a generic webhook (docs/notifications.md shows both and how
a receiver checks the signature)."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from mlpipe_notifier.channels import Channel
from mlpipe_notifier.notices import Milestone, Notice, NoticeKind

EMOJI = {
    NoticeKind.FAILURE: ":x:",
    NoticeKind.GATE_BLOCKED: ":no_entry:",
    NoticeKind.DRIFT: ":warning:",
    NoticeKind.CANARY: ":hatching_chick:",
    NoticeKind.APPROVAL: ":raised_hand:",
}
MILESTONE_EMOJI = {Milestone.PROMOTED: ":rocket:", Milestone.ROLLED_BACK: ":rewind:"}
TIMESTAMP_HEADER = "X-Mlpipe-Timestamp"
SIGNATURE_HEADER = "X-Mlpipe-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_VERSION = "v1"


@dataclass(frozen=True)
class Outgoing:
    """One POST to one channel."""

    channel: Channel
    body: bytes
    headers: dict[str, str]


def _mrkdwn(text: str) -> str:
    """Text shown as is: Slack reads &, < and > as markup (api.slack.com, "Escaping text")."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_text(notice: Notice) -> str:
    """`:x: iris run 6803… failed in trainer: missing_column`, the details, then the link."""
    emoji = MILESTONE_EMOJI.get(Milestone(notice.milestone), "") if notice.milestone else ""
    lines = [f"{emoji or EMOJI[notice.kind]} {_mrkdwn(notice.title)}"]
    lines += [_mrkdwn(d) for d in notice.details]
    if notice.link:
        lines.append(f"<{notice.link}|{_mrkdwn(notice.link_text or notice.link)}>")
    return "\n".join(lines)


def webhook_body(notice: Notice) -> dict[str, object]:
    """The generic webhook's JSON object: every field always present ("" or 0 when the notice
    has none), so a receiver reads one schema."""
    return {
        "kind": notice.kind.value,
        "title": notice.title,
        "text": "\n".join(notice.details),
        "link": notice.link,
        "run_id": notice.run_id,
        "model": notice.model,
        "version": notice.version,
        "stage": notice.stage,
        "reason": notice.reason,
        "milestone": notice.milestone,
        "occurred_at": notice.occurred_at,
        "idempotency_key": notice.key,
        "event_type": notice.event_type,
    }


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """`v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`: the timestamp is signed with the
    body, so a receiver that rejects old timestamps also rejects a replayed request."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={digest.hexdigest()}"


def outgoing(channel: Channel, notice: Notice, now: float, user_agent: str) -> Outgoing:
    """The request that tells `notice` to `channel` at unix time `now` (a webhook's signature
    covers that time: each attempt is signed afresh)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": user_agent,
        IDEMPOTENCY_HEADER: notice.key,
    }
    if channel.kind == "slack":
        body = json.dumps({"text": slack_text(notice)}).encode()
        return Outgoing(channel, body, headers)
    body = json.dumps(webhook_body(notice), sort_keys=True, separators=(",", ":")).encode()
    timestamp = str(int(now))
    headers[TIMESTAMP_HEADER] = timestamp
    headers[SIGNATURE_HEADER] = signature(channel.secret, timestamp, body)
    return Outgoing(channel, body, headers)
