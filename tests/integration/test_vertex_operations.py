"""The vertex target's reading of recorded operations, against the local Vertex AI (no model
server needed): an operation Vertex no longer knows does not wedge a rollout."""

from __future__ import annotations

import pytest
from google.cloud import aiplatform_v1 as v1

from mlpipe.runtime.vertex_api import vertex_client_kwargs
from mlpipe.store.registry import Traffic
from mlpipe_deployer.targets.vertex import VertexTarget
from mlpipe_ops.standins.vertex import VertexStandIn

pytestmark = pytest.mark.cloud


def test_a_recorded_operation_vertex_forgot_is_read_as_finished() -> None:
    with VertexStandIn("p-ops", project_number="1234567", operation_seconds=0.1) as standin:
        endpoints = v1.EndpointServiceClient(**vertex_client_kwargs("us-central1", standin.url))
        endpoint = endpoints.create_endpoint(
            parent="projects/p-ops/locations/us-central1", endpoint=v1.Endpoint(display_name="e")
        ).result(timeout=60)
        target = VertexTarget(
            "p-ops",
            "us-central1",
            endpoint.name.rsplit("/", 1)[1],
            "image",
            "bucket",
            "test",
            api_endpoint=standin.url,
        )
        forgotten = f"{endpoint.name}/operations/42"

        rollout = target.apply("iris", Traffic(None), {}, running=[forgotten])

    assert rollout.done and rollout.resource.startswith(endpoint.name)
