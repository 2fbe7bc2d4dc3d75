"""Posting notices: every channel of one delivery at once, each post bounded in time, and what
its answer means.

A post that is not answered within `total_seconds` (connecting within `connect_seconds`), that
cannot connect, or that is answered 5xx, 408 or 429 may succeed later: transient, the push is
answered 503 and Pub/Sub retries it with the subscription's backoff. Any other 4xx says the
channel is misconfigured (a revoked Slack webhook answers 404 or 410): permanent, no retry.
The bound is on the whole exchange (asyncio.wait_for), not on each read as httpx's own
time-outs are, so a receiver that trickles its answer cannot hold the delivery either.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import time
from dataclasses import dataclass, field

import httpx

from mlpipe_notifier.messages import Outgoing

# Bytes of a channel's answer kept for the record (Slack answers `ok`, or a reason).
ANSWER_BYTES = 512
RETRYABLE_STATUSES = frozenset({408, 429})


class Result(enum.Enum):
    SENT = "sent"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Posted:
    """How one post ended: its result, the HTTP status (0: none), what was said, how long."""

    channel: str
    result: Result
    status: int
    detail: str
    seconds: float


def classify(status: int) -> Result:
    """What a channel's answer means (see the module docstring)."""
    if 200 <= status < 300:
        return Result.SENT
    if status >= 500 or status in RETRYABLE_STATUSES or status < 400:
        # A 3xx is not followed (the URL configured is the one trusted): retry, and say so.
        return Result.TRANSIENT
    return Result.PERMANENT


@dataclass
class Poster:
    """Posts a delivery's requests, each bounded by `total_seconds` (settings: the notifier's
    MLPIPE_NOTIFY_CONNECT_TIMEOUT_SECONDS and MLPIPE_NOTIFY_TIMEOUT_SECONDS)."""

    connect_seconds: float = 2.0
    total_seconds: float = 5.0
    # Built once: each delivery's client would otherwise load the CA bundle again.
    tls: ssl.SSLContext = field(default_factory=httpx.create_ssl_context)

    def post(self, requests: list[Outgoing]) -> list[Posted]:
        """Post every request at once; one Posted each, in order. Never raises for a channel's
        failure: that is its Posted. Runs its own event loop (called from a worker thread)."""
        if not requests:
            return []
        return asyncio.run(self._post_all(requests))

    async def _post_all(self, requests: list[Outgoing]) -> list[Posted]:
        timeout = httpx.Timeout(self.total_seconds, connect=self.connect_seconds)
        async with httpx.AsyncClient(timeout=timeout, verify=self.tls) as client:
            return list(await asyncio.gather(*(self._post_one(client, r) for r in requests)))

    async def _post_one(self, client: httpx.AsyncClient, request: Outgoing) -> Posted:
        name = request.channel.name
        started = time.monotonic()

        def ended(result: Result, status: int, detail: str) -> Posted:
            return Posted(name, result, status, detail, round(time.monotonic() - started, 3))

        try:
            status, answer = await asyncio.wait_for(
                self._exchange(client, request), self.total_seconds
            )
        except (TimeoutError, httpx.TimeoutException):
            return ended(Result.TRANSIENT, 0, f"no answer within {self.total_seconds:g}s")
        except httpx.HTTPError as exc:
            # Connection refused, DNS, TLS, a reset: the request's URL is left out (a Slack
            # webhook's URL is a credential).
            return ended(Result.TRANSIENT, 0, f"cannot post: {type(exc).__name__}")
        return ended(
            classify(status),
            status,
            f"answered {status}: {answer}" if answer else f"answered {status}",
        )

    @staticmethod
    async def _exchange(client: httpx.AsyncClient, request: Outgoing) -> tuple[int, str]:
        """POST, and read the start of the answer only."""
        async with client.stream(
            "POST", request.channel.url, content=request.body, headers=request.headers
        ) as reply:
            head = b""
            async for chunk in reply.aiter_bytes():
                head += chunk
                if len(head) >= ANSWER_BYTES:
                    break
        return reply.status_code, head[:ANSWER_BYTES].decode("utf-8", "replace").strip()
