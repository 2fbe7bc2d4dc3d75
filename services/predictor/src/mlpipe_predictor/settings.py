"""The predictor's settings (MLPIPE_* environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, model_validator

from mlpipe.runtime.settings import CommonSettings


class PredictorSettings(CommonSettings):
    # Vertex AI's custom-container contract (mlpipe_predictor.vertex): its port comes first.
    port: int = Field(
        default=8080, validation_alias=AliasChoices("AIP_HTTP_PORT", "PORT", "MLPIPE_PORT")
    )
    aip_storage_uri: str = Field(default="", validation_alias="AIP_STORAGE_URI")
    aip_health_route: str = Field(default="", validation_alias="AIP_HEALTH_ROUTE")
    aip_predict_route: str = Field(default="", validation_alias="AIP_PREDICT_ROUTE")
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
    # Batch requests: an input of one object up to this size is scored in this process; a
    # bigger one (or a glob) by a batch job (mlpipe_batch), launched by `batch_launcher`.
    batch_inline_max_bytes: int = Field(default=8 * 1024 * 1024, ge=0)
    batch_launcher: Literal["local", "dataflow"] = "local"
    batch_local_workers: int = Field(default=2, ge=1)
    batch_local_mode: Literal["multi_processing", "in_memory"] = "multi_processing"
    batch_job_timeout_seconds: float = Field(default=6 * 3600.0, gt=0)
    # The Dataflow launcher (batch_launcher: dataflow), rendered by mlpipe_ops from the
    # environment file (region, accounts, bucket) and infra/runtime.yaml (machine type, workers).
    region: str = ""
    batch_dataflow_template: str = ""
    batch_dataflow_service_account: str = ""
    batch_dataflow_temp_location: str = ""
    batch_dataflow_staging_location: str = ""
    batch_dataflow_machine_type: str = ""
    batch_dataflow_max_workers: int = Field(default=0, ge=0, le=1000)
    batch_dataflow_network: str = ""
    batch_dataflow_subnetwork: str = ""
    batch_dataflow_private_ips: bool = False
    batch_dataflow_endpoint: str = ""
    # What a job does with bad rows when the request does not say (BadRowPolicy).
    batch_bad_rows: Literal["reject_batch", "write_rejected"] = "reject_batch"
    # Requests with at most this many instances are scored on the event loop (faster than a
    # thread hop); bigger ones in the thread pool, so they never stall small ones.
    inline_instances: int = Field(default=64, ge=0)
    # Prediction logging for drift checks: the share of requests recorded (1: all, 0: off),
    # the in-memory buffer (records beyond it are dropped and counted), and how often the
    # buffer is written to monitoring/<model>/dt=YYYY-MM-DD/ in GCS.
    prediction_log_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    prediction_log_buffer: int = Field(default=50_000, ge=1)
    prediction_log_flush_seconds: float = Field(default=5.0, gt=0)

    @property
    def on_vertex(self) -> bool:
        """Served by Vertex AI: it sets AIP_PREDICT_ROUTE (with AIP_HTTP_PORT and the rest)."""
        return bool(self.aip_predict_route)

    @property
    def receives_push(self) -> bool:
        return not self.on_vertex

    @model_validator(mode="after")
    def _dataflow_needs(self) -> PredictorSettings:
        if self.batch_launcher != "dataflow":
            return self
        missing = [
            name
            for name, value in (
                ("MLPIPE_REGION", self.region),
                ("MLPIPE_BATCH_DATAFLOW_TEMPLATE", self.batch_dataflow_template),
                ("MLPIPE_BATCH_DATAFLOW_TEMP_LOCATION", self.batch_dataflow_temp_location),
            )
            if not value
        ]
        if missing:
            raise ValueError(f"batch jobs on Dataflow (MLPIPE_BATCH_LAUNCHER) need {missing}")
        return self

    @model_validator(mode="after")
    def _vertex_needs(self) -> PredictorSettings:
        if not self.on_vertex:
            return self
        missing = [
            name
            for name, value in (
                ("AIP_STORAGE_URI", self.aip_storage_uri),
                ("AIP_HEALTH_ROUTE", self.aip_health_route),
                ("MLPIPE_SERVE_MODEL", self.serve_model),
                ("MLPIPE_SERVE_VERSION", self.serve_version),
            )
            if not value
        ]
        if missing:
            raise ValueError(f"serving on Vertex AI (AIP_PREDICT_ROUTE is set) needs {missing}")
        return self
