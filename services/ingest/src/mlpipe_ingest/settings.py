"""The ingest service's settings (MLPIPE_* environment variables)."""

from __future__ import annotations

from mlpipe.runtime.settings import CommonSettings
from mlpipe_ingest.sources import SourceSettings
from mlpipe_ingest.sources_http import HttpLimits


class IngestSettings(CommonSettings):
    # Pub/Sub's own limit is 10 MB; larger data belongs in GCS.
    max_inline_bytes: int = 5 * 1024 * 1024
    # Buckets a `gcs` source may read (a JSON list, e.g. ["raw-data"]); the landing bucket is
    # always allowed.
    source_buckets: list[str] = []
    source_max_bytes: int = 100 * 1024 * 1024
    http_connect_timeout_seconds: float = 5.0
    http_read_timeout_seconds: float = 30.0
    http_attempts: int = 3
    http_backoff_seconds: float = 0.5
    # Deliveries (Pub/Sub's deliveryAttempt) an unreachable or 5xx source is retried for
    # before the request is failed for good; below the subscriptions' dead-letter limit.
    source_retry_deliveries: int = 5

    def source_settings(self) -> SourceSettings:
        limits = HttpLimits(
            connect_timeout=self.http_connect_timeout_seconds,
            read_timeout=self.http_read_timeout_seconds,
            max_bytes=self.source_max_bytes,
            attempts=self.http_attempts,
            backoff_seconds=self.http_backoff_seconds,
        )
        buckets = tuple(dict.fromkeys([self.bucket, *self.source_buckets]))
        return SourceSettings(limits, buckets, self.source_max_bytes, self.source_retry_deliveries)
