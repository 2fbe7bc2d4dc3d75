"""How a service reaches Vertex AI: the keyword arguments of a `google.cloud.aiplatform_v1`
client, from the region and two settings (MLPIPE_VERTEX_API_ENDPOINT, MLPIPE_VERTEX_API_TRANSPORT).

On GCP the default is the regional host over gRPC (`us-central1-aiplatform.googleapis.com`).
An `http://` endpoint is a local Vertex AI (mlpipe_ops.standins.vertex): it is reached over
REST (only the REST transport keeps the scheme) with anonymous credentials, as the storage and
Pub/Sub clients reach their emulators.
"""

from __future__ import annotations

from typing import Any, Literal

Transport = Literal["grpc", "rest"]


def vertex_client_kwargs(
    region: str, api_endpoint: str = "", transport: str = ""
) -> dict[str, Any]:
    """`client_options`, `transport` and, for a local endpoint, `credentials`."""
    endpoint = api_endpoint or f"{region}-aiplatform.googleapis.com"
    local = endpoint.startswith("http://")
    kwargs: dict[str, Any] = {
        "client_options": {"api_endpoint": endpoint},
        "transport": transport or ("rest" if local else "grpc"),
    }
    if local:
        from google.auth.credentials import AnonymousCredentials

        kwargs["credentials"] = AnonymousCredentials()
    return kwargs
