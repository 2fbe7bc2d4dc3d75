"""The Earth Engine source's builders: the request checked into a SampleSpec (every problem
named at once), and the ee expression and export the real client builds from it, read back
from what the client sends to the local Earth Engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from mlpipe.errors import PermanentError
from mlpipe.store import layout
from mlpipe.v1 import events_pb2
from mlpipe_ingest.sources_earthengine import export_task, request_id_for, sample_spec
from mlpipe_ops.standins.earthengine import SYNTHETIC_FIELDS, SYNTHETIC_S2, EarthEngineStandIn

REGION = {"type": "Polygon", "coordinates": [[[4, 50], [6, 50], [6, 53], [4, 53], [4, 50]]]}
POINTS = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [5.0, 51.0]},
            "properties": {"crop": "corn", "field_id": "f1"},
        }
    ],
}


def source(**change: Any) -> events_pb2.EarthEngineSource:
    src = events_pb2.EarthEngineSource(
        image_collection=SYNTHETIC_S2,
        bands=["B4", "B8"],
        start_date="2026-04-01",
        end_date="2026-10-01",
        reducer=events_pb2.EARTH_ENGINE_REDUCER_MEAN,
        scale=20,
        region_geojson=json.dumps(REGION),
        samples_geojson=json.dumps(POINTS),
        class_property="crop",
        properties=["field_id"],
    )
    for key, value in change.items():
        if isinstance(value, list):
            del getattr(src, key)[:]
            getattr(src, key).extend(value)
        else:
            setattr(src, key, value)
    return src


def test_a_good_source_is_checked_into_its_spec() -> None:
    spec = sample_spec(source())

    assert spec.reducer == "mean"
    assert spec.region == REGION
    assert spec.samples == POINTS and spec.samples_asset == ""
    assert spec.columns == ("field_id", "crop", "B4", "B8")


def test_the_reducer_defaults_to_the_median() -> None:
    assert sample_spec(source(reducer=0)).reducer == "median"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"bands": []}, "bands is empty"),
        ({"bands": ["B4", "B 8"]}, "not band names"),
        ({"bands": ["B4", "B4"]}, "repeat a band"),
        ({"end_date": "2026-04-01"}, "is empty"),
        ({"start_date": "April"}, "YYYY-MM-DD"),
        ({"scale": -1.0}, "scale"),
        ({"region_geojson": '{"type": "Point", "coordinates": [1, 2]}'}, "GeoJSON Polygon"),
        ({"region_geojson": "not json"}, "region_geojson is not JSON"),
        ({"region_geojson": "[]"}, "GeoJSON Polygon"),
        ({"region_geojson": "null"}, "GeoJSON Polygon"),
        ({"samples_geojson": "null"}, "GeoJSON FeatureCollection"),
        ({"region_geojson": ""}, "region_geojson is empty"),
        (
            {"region_geojson": '{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]}'},
            "closed (lon, lat) rings",
        ),
        ({"class_property": ""}, "class_property"),
        ({"properties": ["crop"]}, "not other property names"),
        ({"samples_geojson": '{"type": "FeatureCollection", "features": []}'}, "no features"),
        ({"class_property": "label"}, "has no 'label' property"),
        ({"image_collection": "bad id!"}, "is not an asset id"),
        ({"time_limit_seconds": -5.0}, "time_limit_seconds"),
    ],
)
def test_a_bad_source_is_refused_naming_the_problem(change: dict[str, Any], named: str) -> None:
    with pytest.raises(PermanentError) as caught:
        sample_spec(source(**change))

    assert caught.value.reason == "invalid_export"
    assert named in caught.value.message


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(PermanentError) as caught:
        sample_spec(source(scale=0, bands=[], class_property=""))

    assert all(p in caught.value.message for p in ("scale", "bands", "class_property"))


@pytest.fixture(scope="module")
def ee() -> Iterator[Any]:
    """earthengine-api initialized against the local Earth Engine (no storage needed here)."""
    import ee as client
    from google.auth.credentials import AnonymousCredentials

    with EarthEngineStandIn() as standin:
        client.Initialize(AnonymousCredentials(), url=standin.url, project="unit")
        yield client
    client.Reset()


def invocations(expression: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each function the serialized expression invokes, with its arguments."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            call = node.get("functionInvocationValue")
            if call:
                found.setdefault(call["functionName"], call.get("arguments", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(expression)
    return found


def test_the_export_is_the_composite_sampled_at_the_points(ee: Any) -> None:
    export_id = layout.export_id_for("r1", "crops")
    task = export_task(
        ee, sample_spec(source()), f"gs://landing/ingest/exports/{export_id}/", export_id
    )

    config = task.config
    assert config["fileExportOptions"] == {
        "fileFormat": "CSV",
        "cloudStorageDestination": {
            "bucket": "landing",
            "filenamePrefix": f"ingest/exports/{export_id}/samples",
        },
    }
    assert config["selectors"] == ["field_id", "crop", "B4", "B8"]
    expression = ee.serializer.encode(config["expression"], for_cloud_api=True)
    calls = invocations(expression)
    assert calls["ImageCollection.load"]["id"] == {"constantValue": SYNTHETIC_S2}
    assert calls["DateRange"] == {
        "start": {"constantValue": "2026-04-01"},
        "end": {"constantValue": "2026-10-01"},
    }
    assert calls["Image.select"]["bandSelectors"] == {"constantValue": ["B4", "B8"]}
    assert "reduce.mean" in calls
    assert "Image.clip" in calls
    sampled = calls["Image.sampleRegions"]
    assert sampled["properties"] == {"constantValue": ["field_id", "crop"]}
    assert sampled["scale"] == {"constantValue": 20}


def test_an_asset_of_samples_and_one_image(ee: Any) -> None:
    spec = sample_spec(
        source(image=f"{SYNTHETIC_S2}/20260601", samples_asset=SYNTHETIC_FIELDS, properties=[])
    )
    task = export_task(ee, spec, "gs://landing/ingest/exports/x/", "x")

    calls = invocations(ee.serializer.encode(task.config["expression"], for_cloud_api=True))
    assert calls["Image.load"]["id"] == {"constantValue": f"{SYNTHETIC_S2}/20260601"}
    assert calls["Collection.loadTable"]["tableId"] == {"constantValue": SYNTHETIC_FIELDS}
    assert "ImageCollection.load" not in calls and "DateRange" not in calls


def test_the_request_id_is_the_same_for_every_delivery_of_a_request() -> None:
    one = layout.export_id_for("req-1", "crops")

    assert one == layout.export_id_for("req-1", "crops")
    assert one != layout.export_id_for("req-2", "crops")
    assert request_id_for(one) == f"mlpipe-{one}"
    assert layout.export_ids(
        [layout.export_record_path(one), layout.export_staging_prefix(one) + "samples.csv"]
    ) == [one]
