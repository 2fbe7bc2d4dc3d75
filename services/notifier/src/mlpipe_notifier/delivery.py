"""The notifier's step: an event → its notice (mlpipe_notifier.notices) → every channel that
takes that kind, once per channel however often the event is delivered: claim the notice's
record, post, record how it ended (mlpipe_notifier.records). With no channel configured, the
notice is one log line instead.

Outcomes are the step protocol's (mlpipe.runtime.steps):
- done when each channel has the notice, now or from an earlier delivery;
- transient when a post may succeed later (no answer, 5xx, 408, 429): 503, so Pub/Sub retries
  with the subscription's backoff and, after its last attempt, dead-letters the message. The
  channels that took it are recorded, so the retry posts only to the others;
- held while another delivery is posting it (503);
- permanent when a channel refused it for good (another 4xx): recorded, the push body kept
  under quarantine/ and acknowledged. Never published: the notifier's failure reporter has no
  publisher (mlpipe.runtime.failures), since a PipelineFailed would come back to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlpipe.errors import PermanentError
from mlpipe.messaging.push import PushMessage
from mlpipe.runtime.steps import Router, StepResult, held, permanent, transient
from mlpipe.store import layout
from mlpipe.store.storage import Storage
from mlpipe.v1 import events_pb2
from mlpipe_notifier import records
from mlpipe_notifier.channels import Channel
from mlpipe_notifier.messages import outgoing, webhook_body
from mlpipe_notifier.notices import (
    Notice,
    approval_notice,
    canary_notice,
    decision_notice,
    drift_notice,
    failure_notice,
    gate_notice,
)
from mlpipe_notifier.posting import Posted, Poster, Result
from mlpipe_notifier.records import Standing

log = logging.getLogger(__name__)

# What became of the notice at each channel, as the reply says it.
SENT, ALREADY_SENT, HELD, FAILED, REJECTED = "sent", "already sent", "held", "failed", "rejected"
# ... for a channel this delivery did not post to.
NOT_POSTED = {Standing.SENT: ALREADY_SENT, Standing.HELD: HELD, Standing.REJECTED: REJECTED}
Build = Callable[[Any, str], Notice | None]
# The notice each event type may be (None: nothing to tell), given the console's URL.
NOTICES: dict[str, Build] = {
    events_pb2.PipelineFailed.DESCRIPTOR.full_name: failure_notice,
    events_pb2.EvaluationCompleted.DESCRIPTOR.full_name: gate_notice,
    events_pb2.DriftDetected.DESCRIPTOR.full_name: drift_notice,
    events_pb2.DeploymentCompleted.DESCRIPTOR.full_name: canary_notice,
    events_pb2.ApprovalRequested.DESCRIPTOR.full_name: approval_notice,
    events_pb2.ApprovalDecided.DESCRIPTOR.full_name: decision_notice,
}


@dataclass
class Notifier:
    storage: Storage
    channels: tuple[Channel, ...]
    console_url: str = ""
    poster: Poster = field(default_factory=Poster)
    lease_seconds: float = 30.0
    user_agent: str = "mlpipe-notifier"
    router: Router = field(init=False)

    def __post_init__(self) -> None:
        self.router = Router({kind: self._teller(build) for kind, build in NOTICES.items()})

    def __call__(self, message: PushMessage) -> StepResult:
        return self.router(message)

    def _teller(self, build: Build) -> Callable[[Any, PushMessage], StepResult]:
        return lambda event, message: self.notify(build(event, self.console_url), message)

    def notify(self, notice: Notice | None, message: PushMessage) -> StepResult:
        """Tell `notice` to every channel that takes its kind; see the module docstring."""
        if notice is None:
            return StepResult("ignored", {"detail": "nothing to tell"})
        if not self.channels:
            log.info(
                "notice (no channel configured): %s",
                notice.title,
                extra={"notice": webhook_body(notice)},
            )
            return StepResult("logged", {"notice": notice.key}, notice.run_id)
        wanted = [c for c in self.channels if c.takes(notice.kind)]
        if not wanted:
            detail = f"no channel takes {notice.kind} notices"
            return StepResult("ignored", {"detail": detail, "notice": notice.key}, notice.run_id)
        claims = {
            c.name: records.claim(
                self.storage,
                layout.notification_path(c.name, notice.key),
                message_id=message.message_id,
                lease_seconds=self.lease_seconds,
            )
            for c in wanted
        }
        mine = [c for c in wanted if claims[c.name].standing is Standing.MINE]
        now = time.time()
        posted = self.poster.post([outgoing(c, notice, now, self.user_agent) for c in mine])
        states = {
            name: NOT_POSTED[c.standing]
            for name, c in claims.items()
            if c.standing is not Standing.MINE
        }
        problems = {
            name: str(c.body.get("detail", "refused before"))
            for name, c in claims.items()
            if c.standing is Standing.REJECTED
        }
        for channel, post in zip(mine, posted, strict=True):
            states[channel.name] = self._record(channel, notice, claims[channel.name], post)
            if states[channel.name] in (FAILED, REJECTED):
                problems[channel.name] = post.detail
        return _outcome(notice, states, problems)

    def _record(self, channel: Channel, notice: Notice, claim: records.Claim, post: Posted) -> str:
        """Record how `post` ended; the channel's state for the reply."""
        state = {
            Result.SENT: records.SENT,
            Result.TRANSIENT: records.FAILED,
            Result.PERMANENT: records.REJECTED,
        }[post.result]
        log.log(
            logging.INFO if post.result is Result.SENT else logging.WARNING,
            "%s notice %s to %s: %s (%.2fs)",
            notice.kind,
            notice.key,
            channel.name,
            post.detail,
            post.seconds,
            extra={"channel": channel.name, "notice": notice.key, "status": post.status},
        )
        path = layout.notification_path(channel.name, notice.key)
        recorded = records.settle(
            self.storage,
            path,
            claim,
            state,
            status=post.status,
            detail=post.detail,
            seconds=post.seconds,
        )
        if post.result is Result.SENT:
            return SENT  # the channel has it, whoever took the claim over meanwhile
        if not recorded:
            return HELD  # the delivery that took the claim over is posting it
        return FAILED if post.result is Result.TRANSIENT else REJECTED


def _outcome(notice: Notice, states: dict[str, str], problems: dict[str, str]) -> StepResult:
    """One outcome for all channels: a retry if any channel may still take it, else a rejection
    if one refused it, else done."""
    said = "; ".join(f"{name}: {problems[name]}" for name in sorted(problems))
    if FAILED in states.values():
        result = transient(f"{notice.kind} notice not posted everywhere ({said})", notice.run_id)
    elif HELD in states.values():
        result = held(f"{notice.kind} notice being posted by another delivery", notice.run_id)
    elif REJECTED in states.values():
        refused = PermanentError(
            "channel_rejected", f"{notice.kind} notice {notice.key} refused: {said}"
        )
        result = permanent(refused, notice.run_id)
    else:
        result = StepResult("notified", {}, notice.run_id)
    result.detail |= {"notice": notice.key, "channels": states}
    return result
