"""Earth Engine as a source: band values of a composite sampled at labelled points, exported to
Cloud Storage as CSV by an Earth Engine batch table export, through `earthengine-api`.

The request (`EarthEngineSource`) is checked into a `SampleSpec` (a pure function), from
which the ee expression is built with Earth Engine's own client: the image collection filtered
to the date range, its bands selected, reduced to one image by the reducer, clipped to the
region, and `sampleRegions` at the sample points with their class property, at the scale.
`ee.batch.Export.table.toCloudStorage` shapes the export to the staging prefix; it is started
with the export's own request id, so a repeated start answers the operation already running
(Earth Engine's `requestId`). `poll` reads the operation by its name.

`EarthEngineBackend` is the `ExportBackend` (mlpipe_ingest.exports) registered for the
`earth_engine` source. Locally, `MLPIPE_EARTHENGINE_URL` points the client at the stand-in
(mlpipe_ops.standins.earthengine) with anonymous credentials; on GCP it is empty and the
service account's default credentials are used.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from google.cloud import storage as gcs

from mlpipe.errors import PermanentError, TransientError
from mlpipe.store.storage import parse_gs_uri
from mlpipe.v1 import events_pb2
from mlpipe_ingest.exports import ExportStatus

KIND = "earth_engine"
SCOPES = (
    "https://www.googleapis.com/auth/earthengine",
    "https://www.googleapis.com/auth/cloud-platform",
)
R = events_pb2.EarthEngineReducer
REDUCERS = {
    R.EARTH_ENGINE_REDUCER_UNSPECIFIED: "median",
    R.EARTH_ENGINE_REDUCER_MEDIAN: "median",
    R.EARTH_ENGINE_REDUCER_MEAN: "mean",
    R.EARTH_ENGINE_REDUCER_MIN: "min",
    R.EARTH_ENGINE_REDUCER_MAX: "max",
}
ASSET = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,499}$")
BAND = re.compile(r"^[A-Za-z0-9_]{1,64}$")
PROPERTY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
RUNNING_STATES = ("PENDING", "RUNNING", "CANCELLING")
# Earth Engine's messages for an export whose computation failed, by what they name.
FAILURE_REASONS = (
    (re.compile(r"asset '[^']*' not found|asset .* does not exist", re.I), "unknown_asset"),
    (re.compile(r"did not match any bands", re.I), "unknown_band"),
    (re.compile(r"collection is empty|no image in the date range", re.I), "empty_composite"),
)
# How much of an exported CSV is read to tell an empty sample (a header and no row).
HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class SampleSpec:
    """A checked EarthEngineSource."""

    image_collection: str
    image: str
    bands: tuple[str, ...]
    start_date: str
    end_date: str
    reducer: str
    scale: float
    region: dict[str, Any]
    samples_asset: str
    samples: dict[str, Any] | None
    class_property: str
    properties: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """The exported CSV's columns, in order: the copied properties, the class (last of the
        properties), the bands."""
        return (*self.properties, self.class_property, *self.bands)


def _ring_ok(ring: Any) -> bool:
    return (
        isinstance(ring, list)
        and len(ring) >= 4
        and ring[0] == ring[-1]
        and all(
            isinstance(p, list)
            and len(p) >= 2
            and all(isinstance(c, int | float) for c in p[:2])
            and -180 <= p[0] <= 180
            and -90 <= p[1] <= 90
            for p in ring
        )
    )


NOT_JSON = object()


def _parse_json(text: str, what: str, problems: list[str]) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        problems.append(f"{what} is not JSON: {exc}")
        return NOT_JSON


def _check_samples(samples: Any, class_property: str, problems: list[str]) -> None:
    if not isinstance(samples, dict) or samples.get("type") != "FeatureCollection":
        problems.append("samples_geojson must be a GeoJSON FeatureCollection")
        return
    features = samples.get("features")
    if not isinstance(features, list) or not features:
        problems.append("samples_geojson has no features")
        return
    for i, feature in enumerate(features):
        geometry = (feature or {}).get("geometry") or {}
        coords = geometry.get("coordinates")
        if geometry.get("type") != "Point" or not (isinstance(coords, list) and len(coords) >= 2):
            problems.append(f"samples_geojson feature {i} is not a Point")
            return
        if class_property and class_property not in ((feature or {}).get("properties") or {}):
            problems.append(f"samples_geojson feature {i} has no {class_property!r} property")
            return


def sample_spec(source: events_pb2.EarthEngineSource) -> SampleSpec:
    """The request's export, checked; every problem found is named at once."""
    problems: list[str] = []
    imagery = source.WhichOneof("imagery")
    image_collection = source.image_collection if imagery == "image_collection" else ""
    image = source.image if imagery == "image" else ""
    if imagery is None:
        problems.append("name an image_collection or an image")
    elif not ASSET.match(image_collection or image):
        problems.append(f"{imagery} {image_collection or image!r} is not an asset id")
    bands = tuple(source.bands)
    if not bands:
        problems.append("bands is empty")
    bad = [b for b in bands if not BAND.match(b)]
    if bad:
        problems.append(f"bands {bad} are not band names")
    if len(set(bands)) != len(bands):
        problems.append(f"bands {list(bands)} repeat a band")
    if image_collection:
        if not (DATE.match(source.start_date) and DATE.match(source.end_date)):
            problems.append("start_date and end_date must be YYYY-MM-DD")
        elif source.start_date >= source.end_date:
            problems.append(
                f"the date range {source.start_date}..{source.end_date} is empty (end_date is "
                "exclusive)"
            )
    if source.reducer not in REDUCERS:
        problems.append(f"reducer {source.reducer} is not one of {sorted(REDUCERS)}")
    if not source.scale > 0:
        problems.append(f"scale {source.scale} must be positive (metres per pixel)")
    region: Any = None
    if not source.region_geojson:
        problems.append("region_geojson is empty")
    else:
        region = _parse_json(source.region_geojson, "region_geojson", problems)
        if region is not NOT_JSON and not (
            isinstance(region, dict)
            and region.get("type") == "Polygon"
            and isinstance(region.get("coordinates"), list)
            and region["coordinates"]
            and all(_ring_ok(r) for r in region["coordinates"])
        ):
            problems.append("region_geojson must be a GeoJSON Polygon with closed (lon, lat) rings")
    if not PROPERTY.match(source.class_property):
        problems.append(f"class_property {source.class_property!r} is not a property name")
    properties = tuple(source.properties)
    bad = [p for p in properties if not PROPERTY.match(p) or p == source.class_property]
    if bad:
        problems.append(f"properties {bad} are not other property names")
    clash = set(bands) & {*properties, source.class_property}
    if clash:
        problems.append(f"{sorted(clash)} are both bands and properties")
    which = source.WhichOneof("samples")
    samples = None
    if which is None:
        problems.append("name samples_asset or samples_geojson")
    elif which == "samples_asset" and not ASSET.match(source.samples_asset):
        problems.append(f"samples_asset {source.samples_asset!r} is not an asset id")
    elif which == "samples_geojson":
        samples = _parse_json(source.samples_geojson, "samples_geojson", problems)
        if samples is not NOT_JSON:
            _check_samples(samples, source.class_property, problems)
    if source.time_limit_seconds < 0:
        problems.append("time_limit_seconds must not be negative")
    if problems:
        raise PermanentError("invalid_export", "earth_engine source: " + "; ".join(problems))
    return SampleSpec(
        image_collection=image_collection,
        image=image,
        bands=bands,
        start_date=source.start_date,
        end_date=source.end_date,
        reducer=REDUCERS[source.reducer],
        scale=source.scale,
        region=region,
        samples_asset=source.samples_asset if which == "samples_asset" else "",
        samples=samples,
        class_property=source.class_property,
        properties=properties,
    )


def sample_table(ee: Any, spec: SampleSpec) -> Any:
    """The ee.FeatureCollection to export: one feature per sample point with a pixel."""
    region = ee.Geometry(spec.region)
    if spec.image_collection:
        collection = (
            ee.ImageCollection(spec.image_collection)
            .filterDate(spec.start_date, spec.end_date)
            .select(list(spec.bands))
        )
        image = getattr(collection, spec.reducer)()
    else:
        image = ee.Image(spec.image).select(list(spec.bands))
    points = ee.FeatureCollection(spec.samples_asset or spec.samples)
    return image.clip(region).sampleRegions(
        collection=points,
        properties=[*spec.properties, spec.class_property],
        scale=spec.scale,
        geometries=False,
    )


def export_task(ee: Any, spec: SampleSpec, staging_uri: str, export_id: str) -> Any:
    """The ee.batch.Task of the CSV export to `staging_uri` (not started)."""
    bucket, prefix = parse_gs_uri(staging_uri)
    return ee.batch.Export.table.toCloudStorage(
        collection=sample_table(ee, spec),
        description=f"mlpipe-{export_id}",
        bucket=bucket,
        fileNamePrefix=f"{prefix}samples",
        fileFormat="CSV",
        selectors=list(spec.columns),
    )


def request_id_for(export_id: str) -> str:
    """Earth Engine's requestId for the export: a repeated start finds the first one's
    operation instead of starting another."""
    return f"mlpipe-{export_id}"


@dataclass(frozen=True)
class EarthEngineSettings:
    project: str  # the Cloud project registered for Earth Engine (quota and billing)
    url: str = ""  # the API's base URL; empty: the real service
    max_retries: int = 1  # the client's own retries of a 429/5xx within one call


def _http_status(exc: BaseException) -> int:
    """The HTTP status behind an EEException (the client raises it from googleapiclient's
    HttpError, which stays as its context)."""
    from googleapiclient.errors import HttpError  # type: ignore[import-untyped]

    cause = exc.__cause__ or exc.__context__
    return int(cause.status_code) if isinstance(cause, HttpError) else 0


class EarthEngineBackend:
    """Starts and polls Earth Engine table exports through earthengine-api."""

    kind = KIND
    _lock = threading.Lock()
    _initialized: tuple[str, str] | None = None  # the (url, project) ee was initialized for

    def __init__(self, settings: EarthEngineSettings, storage: gcs.Client) -> None:
        self.settings = settings
        self.storage = storage

    def _ee(self) -> Any:
        import ee
        from googleapiclient.errors import Error as ApiClientError

        key = (self.settings.url, self.settings.project)
        with EarthEngineBackend._lock:
            if EarthEngineBackend._initialized != key or not ee.data.is_initialized():
                try:
                    ee.Initialize(
                        self._credentials(), url=self.settings.url or None, project=key[1]
                    )
                except ee.EEException as exc:
                    raise TransientError(f"earth engine: cannot initialize: {exc}") from exc
                except (OSError, ApiClientError) as exc:  # the discovery document's fetch
                    raise TransientError(f"earth engine unreachable: {exc}") from exc
                ee.data.setMaxRetries(self.settings.max_retries)
                EarthEngineBackend._initialized = key
        return ee

    def _credentials(self) -> Any:
        if self.settings.url:
            # A local stand-in: it asks for no token.
            from google.auth.credentials import AnonymousCredentials

            return AnonymousCredentials()
        import google.auth

        credentials, _ = google.auth.default(scopes=list(SCOPES))
        return credentials

    def start(
        self, request: events_pb2.IngestRequest, staging_uri: str, export_id: str
    ) -> dict[str, str]:
        spec = sample_spec(request.earth_engine)
        ee = self._ee()
        try:
            task = export_task(ee, spec, staging_uri, export_id)
            # What `task.start()` does, but with our request id: start() makes a random one,
            # and then a redelivery would start a second export.
            operation = ee.data.exportTable(request_id_for(export_id), task.config)
        except ee.EEException as exc:
            status = _http_status(exc)
            if status == 429 or status >= 500:
                # A quota (too many tasks queued) or the service itself: Pub/Sub redelivers.
                raise TransientError(
                    f"earth engine export not started (HTTP {status}): {exc}"
                ) from exc
            if status:
                raise PermanentError(
                    "export_refused", f"earth engine refused the export (HTTP {status}): {exc}"
                ) from exc
            raise PermanentError("invalid_export", f"earth engine export: {exc}") from exc
        except OSError as exc:
            raise TransientError(f"earth engine unreachable: {exc}") from exc
        return {"operation": str(operation["name"]), "staging_uri": staging_uri}

    def poll(self, recorded: dict[str, str]) -> ExportStatus:
        ee = self._ee()
        name = recorded["operation"]
        try:
            operation = ee.data.getOperation(name)
        except ee.EEException as exc:
            status = _http_status(exc)
            if status == 404:
                return ExportStatus("failed", reason="export_lost", message=f"{name}: {exc}")
            reason = "quota" if status == 429 else "unavailable"
            return ExportStatus("running", reason=reason, message=str(exc), transient=True)
        except OSError as exc:
            return ExportStatus("running", reason="unavailable", message=str(exc), transient=True)
        metadata = operation.get("metadata") or {}
        state = str(metadata.get("state", ""))
        if state in RUNNING_STATES or (not state and not operation.get("done")):
            return ExportStatus("running", message=f"{name} is {state or 'running'}")
        error = (operation.get("error") or {}).get("message", "")
        if state == "CANCELLED":
            return ExportStatus(
                "failed",
                reason="export_cancelled",
                message=f"earth engine export {name} was cancelled{': ' + error if error else ''}",
            )
        if state != "SUCCEEDED" or operation.get("error"):
            reason = next((r for pattern, r in FAILURE_REASONS if pattern.search(error)), "")
            return ExportStatus(
                "failed",
                reason=reason or "export_failed",
                message=f"earth engine export {name} {state or 'FAILED'}: "
                f"{error or 'no error message'}",
            )
        return self._exported(name, recorded["staging_uri"])

    def _exported(self, name: str, staging_uri: str) -> ExportStatus:
        bucket, prefix = parse_gs_uri(staging_uri)
        blobs = [
            b for b in self.storage.list_blobs(bucket, prefix=prefix) if b.name.endswith(".csv")
        ]
        if not blobs:
            return ExportStatus(
                "failed",
                reason="no_output",
                message=f"earth engine export {name} succeeded but wrote no CSV under "
                f"{staging_uri}",
            )
        if len(blobs) > 1:
            return ExportStatus(
                "failed",
                reason="export_shards",
                message=f"earth engine export {name} wrote {len(blobs)} files under "
                f"{staging_uri}; a sample export is landed from one",
            )
        blob = blobs[0]
        head = blob.download_as_bytes(start=0, end=HEAD_BYTES - 1)
        if len([line for line in head.splitlines() if line.strip()]) <= 1:
            return ExportStatus(
                "failed",
                reason="empty_sample",
                message=f"earth engine export {name}: no sample point fell on a pixel of the "
                f"composite inside the region (gs://{bucket}/{blob.name} has no rows)",
            )
        return ExportStatus("done", objects=(f"gs://{bucket}/{blob.name}",))

    def cancel(self, recorded: dict[str, str]) -> None:
        self._ee().data.cancelOperation(recorded["operation"])
