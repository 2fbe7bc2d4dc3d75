"""The ingest service's settings (MLPIPE_* environment variables)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from mlpipe.runtime.settings import CommonSettings
from mlpipe_ingest.sources import SourceSettings
from mlpipe_ingest.sources_earthengine import EarthEngineSettings
from mlpipe_ingest.sources_http import HttpLimits

if TYPE_CHECKING:
    from mlpipe_ingest.sources_bigquery import BigQuerySettings


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
    # Identities (a JSON list of emails, or ["*"]) that may POST an IngestRequest to
    # /v1/ingest besides the push account; "*" admits whoever Cloud Run's IAM let in.
    direct_callers: list[str] = []
    # The BigQuery source: the project its jobs run in (empty: MLPIPE_PROJECT), the API
    # (MLPIPE_BIGQUERY_URL; empty: the real one, else a local stand-in, anonymously) and the
    # jobs' default location.
    bigquery_project: str = ""
    bigquery_url: str = ""
    bigquery_location: str = "US"
    # BigQuery writes at most 1 GB of logical data to one file; a larger result is refused.
    bigquery_single_file_bytes: int = 1_000_000_000
    # One BigQuery call's own retries (rate limits, 5xx) inside a push or a check.
    bigquery_request_seconds: float = 10.0
    # An export not done this long after it started fails (a request may set its own);
    # ingest's exports check cancels and reports it.
    export_timeout_seconds: float = 3600.0
    # Landing an export reads its file in ranged reads of this size (the sha256).
    export_chunk_bytes: int = 8 * 1024 * 1024
    # A `gcs` source of a CSV or Parquet object at least this large is validated by a Beam
    # job (mlpipe_batch.validate) and copied server-side, never read into ingest; 0: never.
    # (MLPIPE_INGEST_BEAM_MIN_BYTES; smaller objects keep the in-service path, which refuses
    # objects over MLPIPE_SOURCE_MAX_BYTES.)
    ingest_beam_min_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # Where that job runs: "local" (a process on this host, DirectRunner) or "dataflow" (the
    # batch job's Flex Template, MLPIPE_VALIDATION_DATAFLOW_*).
    validation_launcher: Literal["local", "dataflow"] = "local"
    validation_local_workers: int = Field(default=2, ge=1)
    # The DirectRunner's mode for a local job: in_memory (one process) starts in seconds;
    # multi_processing's workers took ~25 s more to start here (bench/RESULTS.md).
    validation_local_mode: Literal["multi_processing", "in_memory"] = "in_memory"
    # Rows the job checks as one part (its workers hold a few parts at a time).
    validation_chunk_rows: int = Field(default=50_000, ge=1)
    region: str = ""
    validation_dataflow_template: str = ""  # gs://…/templates/batch.json
    validation_dataflow_service_account: str = ""
    validation_dataflow_temp_location: str = ""
    validation_dataflow_staging_location: str = ""
    validation_dataflow_machine_type: str = ""
    validation_dataflow_max_workers: int = 0
    validation_dataflow_endpoint: str = ""  # a local stand-in's URL; empty: Google's
    earthengine_project: str = Field(
        default="",
        description="The Cloud project registered for Earth Engine that exports run under; "
        "empty: MLPIPE_PROJECT.",
    )
    earthengine_url: str = Field(
        default="",
        description="Earth Engine's API base URL; empty: the real service. An http:// URL is a "
        "local stand-in (mlpipe_ops.standins.earthengine), called with anonymous credentials.",
    )
    earthengine_max_retries: int = Field(
        default=1,
        ge=0,
        description="The Earth Engine client's retries of a 429/5xx within one call (it sleeps "
        "up to 2**n s before retry n, inside the push: keep it small, Pub/Sub retries too).",
    )
    export_check_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Check running exports this often from inside ingest (local stacks); 0: "
        "only POST /v1/exports:check (Cloud Scheduler on GCP).",
    )
    export_backoff_seconds: float = Field(
        default=30.0,
        ge=0,
        description="After a transient error (a quota), wait this long before the export's "
        "next check, doubling each time.",
    )

    def earthengine_settings(self) -> EarthEngineSettings:
        return EarthEngineSettings(
            project=self.earthengine_project or self.project,
            url=self.earthengine_url.rstrip("/"),
            max_retries=self.earthengine_max_retries,
        )

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

    def bigquery_settings(self) -> BigQuerySettings:
        # The BigQuery client is imported on first use, not at every start of ingest.
        from mlpipe_ingest.sources_bigquery import BigQuerySettings

        return BigQuerySettings(
            project=self.bigquery_project or self.project,
            location=self.bigquery_location,
            timeout_seconds=self.export_timeout_seconds,
            single_file_bytes=self.bigquery_single_file_bytes,
            request_seconds=self.bigquery_request_seconds,
            env=self.env,
        )
