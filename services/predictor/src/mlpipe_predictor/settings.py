"""The predictor's settings (MLPIPE_* environment variables)."""

from __future__ import annotations

from pydantic import Field

from mlpipe.runtime.settings import CommonSettings


class PredictorSettings(CommonSettings):
    # Vertex AI online prediction's request limit.
    max_body_bytes: int = Field(default=1_500_000, ge=1024)
    # A Cloud Run revision or a Vertex AI deployment serves exactly this model version
    # (set by the deployer's cloud targets); empty: every model's champion (and canary).
    serve_model: str = ""
    serve_version: int = Field(default=0, ge=0)
    onnx_threads: int = Field(default=1, ge=1)
    # How often each instance checks the registry's aliases (and settles canary counts), so
    # every instance converges on a deployment without its push; 0: only on the push.
    registry_watch_seconds: float = Field(default=1.0, ge=0)
    batch_chunk_rows: int = Field(default=10_000, ge=1)
    # Requests with at most this many instances are scored on the event loop (faster than a
    # thread hop); bigger ones in the thread pool, so they never stall small ones.
    inline_instances: int = Field(default=64, ge=0)
    # Prediction logging for drift checks: the share of requests recorded (1: all, 0: off),
    # the in-memory buffer (records beyond it are dropped and counted), and how often the
    # buffer is written to monitoring/<model>/dt=YYYY-MM-DD/ in GCS.
    prediction_log_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    prediction_log_buffer: int = Field(default=50_000, ge=1)
    prediction_log_flush_seconds: float = Field(default=5.0, gt=0)
