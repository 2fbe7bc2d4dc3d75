"""How services reach Vertex AI: the regional host over gRPC on GCP, a local http:// endpoint
over REST with anonymous credentials."""

from __future__ import annotations

from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform_v1

from mlpipe.runtime.vertex_api import vertex_client_kwargs


def test_on_gcp_the_regional_host_over_grpc_with_the_default_credentials() -> None:
    kwargs = vertex_client_kwargs("europe-west4")

    assert kwargs == {
        "client_options": {"api_endpoint": "europe-west4-aiplatform.googleapis.com"},
        "transport": "grpc",
    }


def test_a_local_endpoint_is_reached_over_rest_anonymously() -> None:
    kwargs = vertex_client_kwargs("us-central1", "http://127.0.0.1:8095")
    client = aiplatform_v1.EndpointServiceClient(**kwargs)

    assert kwargs["transport"] == "rest"
    assert isinstance(kwargs["credentials"], AnonymousCredentials)
    assert client.api_endpoint == "http://127.0.0.1:8095"
    assert vertex_client_kwargs("us-central1", "vertex.example:443", "rest")["transport"] == "rest"
