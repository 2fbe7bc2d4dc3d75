"""The deployer's settings: where models roll out to, and how (MLPIPE_* environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlpipe.runtime.settings import CommonSettings

# `cloud_run` is the spelling of infra/environments/*.yaml's deploy_target; `cloudrun` works too.
TARGETS = {"local": "local", "cloud_run": "cloud_run", "cloudrun": "cloud_run", "vertex": "vertex"}


class DeployerSettings(CommonSettings):
    deploy_target: str = Field(
        default="local", description="local (the predictor service), cloud_run or vertex."
    )
    canary_percent: int = Field(
        default=0, ge=0, le=99, description="Traffic a new version gets first; 0 promotes it."
    )
    canary_promote_after: int = Field(
        default=0,
        ge=0,
        description="Promote a canary by itself after this many successful predictions "
        "(local target; 0: only `mlpipe promote`).",
    )
    compile_onnx: bool = Field(default=True, description="Compile and check an ONNX model.")
    registry_claim_lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A registration claim older than this (its deployer died half way) is "
        "taken over by the next delivery.",
    )
    region: str = "us-central1"
    # cloud_run: the predictor service that gets one revision per served version.
    cloud_run_service: str = "mlpipe-predictor"
    predictor_image: str = Field(
        default="", description="The predictor's container image (cloud_run and vertex)."
    )
    # vertex: the endpoint models deploy to, and the machines that serve them.
    vertex_endpoint: str = Field(
        default="",
        description="Endpoint id or resource name; it serves this deployer's model only "
        "(Vertex replaces an endpoint's whole split, so models never share one).",
    )
    vertex_machine_type: str = "n1-standard-2"
    vertex_min_replicas: int = Field(default=1, ge=1)
    vertex_max_replicas: int = Field(default=1, ge=1)
    vertex_serving_account: str = Field(
        default="",
        description="The service account the predictor runs as on Vertex AI "
        "(DeployedModel.service_account); the deployer needs actAs on it.",
    )
    vertex_api_endpoint: str = Field(
        default="",
        description="Vertex AI's API host; default <region>-aiplatform.googleapis.com. An "
        "http:// URL is a local Vertex AI (mlpipe vertex-standin).",
    )
    vertex_api_transport: Literal["", "grpc", "rest"] = Field(
        default="", description="grpc or rest; default grpc, rest for an http:// endpoint."
    )
    rollout_check_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Check running rollouts this often from inside the deployer (local "
        "stacks); 0: only POST /v1/rollouts:check (Cloud Scheduler on GCP).",
    )

    @field_validator("deploy_target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        if value not in TARGETS:
            raise ValueError(
                f"must be one of local, cloud_run (or cloudrun), vertex; not {value!r}"
            )
        return TARGETS[value]

    @model_validator(mode="after")
    def _target_settings(self) -> DeployerSettings:
        missing = []
        if self.deploy_target in ("cloud_run", "vertex") and not self.predictor_image:
            missing.append("MLPIPE_PREDICTOR_IMAGE")
        if self.deploy_target == "vertex" and not self.vertex_endpoint:
            missing.append("MLPIPE_VERTEX_ENDPOINT")
        if self.deploy_target == "vertex" and not self.vertex_serving_account:
            missing.append("MLPIPE_VERTEX_SERVING_ACCOUNT")
        if missing:
            raise ValueError(f"deploy target {self.deploy_target} needs {', '.join(missing)}")
        return self
