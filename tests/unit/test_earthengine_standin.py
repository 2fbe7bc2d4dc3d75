"""The local Earth Engine answers earthengine-api as the REST reference says
(docs/earthengine-standin.md): the operation's states, requestId, cancel, errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from mlpipe_ops.standins.earthengine import SYNTHETIC_FIELDS, SYNTHETIC_S2, EarthEngineStandIn


@pytest.fixture
def standin() -> Iterator[EarthEngineStandIn]:
    with EarthEngineStandIn("unit", export_seconds=0.2) as s:
        yield s


@pytest.fixture
def ee(standin: EarthEngineStandIn) -> Iterator[Any]:
    import ee as client
    from google.auth.credentials import AnonymousCredentials

    # From a clean client: another test in this process may have initialized it (its
    # algorithms are kept on the client's classes until a Reset).
    client.Reset()
    client.Initialize(AnonymousCredentials(), url=standin.url, project="unit")
    client.data.setMaxRetries(0)
    yield client
    client.Reset()


def config(ee: Any, collection: str = SYNTHETIC_S2, band: str = "B4") -> dict[str, Any]:
    image = ee.ImageCollection(collection).filterDate("2026-04-01", "2026-10-01").select([band])
    samples = image.median().sampleRegions(
        collection=ee.FeatureCollection(SYNTHETIC_FIELDS), properties=["crop"], scale=10
    )
    task = ee.batch.Export.table.toCloudStorage(
        collection=samples, description="t", bucket="b", fileNamePrefix="x/samples"
    )
    return dict(task.config)


def wait_done(ee: Any, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        operation = ee.data.getOperation(name)
        if operation["done"]:
            return dict(operation)
        time.sleep(0.05)
    raise AssertionError(f"{name} not done")


def test_the_client_initializes_from_the_discovery_document_and_algorithms(
    ee: Any, standin: EarthEngineStandIn
) -> None:
    assert standin.requests[:3] == [
        ("GET", "/$discovery/rest"),
        ("GET", "/$discovery/rest"),
        ("GET", "/v1/projects/unit/algorithms"),
    ]


def test_an_export_is_pending_then_running_then_failed_with_the_evaluation_error(
    ee: Any,
) -> None:
    operation = ee.data.exportTable("r1", config(ee, band="B99"))

    assert operation["name"].startswith("projects/unit/operations/")
    assert operation["metadata"]["state"] == "PENDING" and operation["done"] is False
    done = wait_done(ee, operation["name"])
    assert done["metadata"]["state"] == "FAILED"
    assert done["metadata"]["type"] == "EXPORT_FEATURES"
    assert done["error"]["code"] == 3
    assert "Pattern 'B99' did not match any bands" in done["error"]["message"]


def test_an_unknown_collection_fails_the_export_naming_it(ee: Any) -> None:
    operation = ee.data.exportTable("r1", config(ee, collection="NO/SUCH"))

    done = wait_done(ee, operation["name"])
    assert "ImageCollection asset 'NO/SUCH' not found" in done["error"]["message"]


def test_a_repeated_request_id_answers_the_first_operation(
    ee: Any, standin: EarthEngineStandIn
) -> None:
    first = ee.data.exportTable("same", config(ee))
    again = ee.data.exportTable("same", config(ee, band="B8"))
    other = ee.data.exportTable("other", config(ee))

    assert again["name"] == first["name"] != other["name"]
    assert len(standin.operations()) == 2


def test_a_cancelled_export_is_done_with_code_1(ee: Any, standin: EarthEngineStandIn) -> None:
    standin.fail_next("never_finish")
    operation = ee.data.exportTable("r1", config(ee))

    ee.data.cancelOperation(operation["name"])

    done = ee.data.getOperation(operation["name"])
    assert done["done"] is True and done["metadata"]["state"] == "CANCELLED"
    assert done["error"]["code"] == 1


def test_a_quota_refusal_is_429_and_an_unknown_operation_404(
    ee: Any, standin: EarthEngineStandIn
) -> None:
    from googleapiclient.errors import HttpError

    standin.fail_next("quota")
    with pytest.raises(ee.EEException) as refused:
        ee.data.exportTable("r1", config(ee))
    with pytest.raises(ee.EEException) as missing:
        ee.data.getOperation("projects/unit/operations/NOPE")

    for caught, status in ((refused, 429), (missing, 404)):
        assert isinstance(caught.value.__context__, HttpError)
        assert caught.value.__context__.status_code == status
    assert "Too many tasks" in str(refused.value)
    assert standin.operations() == []
