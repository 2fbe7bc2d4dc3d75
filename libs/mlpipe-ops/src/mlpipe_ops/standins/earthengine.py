"""A local Earth Engine: the REST calls `earthengine-api` makes for a table export to Cloud
Storage, answering as the reference says.

The real client (`ee.Initialize(credentials, url=stand_in.url, project=...)`, anonymous
credentials) asks, in this order (found by running it against this server and logging):
- `GET /$discovery/rest?version=v1` — the API's discovery document, from which the client
  builds its methods (twice: a plain and a raw resource);
- `GET /v1/projects/{project}/algorithms` — the algorithm signatures (`ApiFunction.initialize`);
- `POST /v1/projects/{project}/table:export` — the export, with the serialized expression and
  the client's `requestId`; answers a long-running operation;
- `GET /v1/{name=projects/*/operations/*}` while it runs, `POST .../{name}:cancel` to stop it,
  `GET /v1/projects/{project}/operations` to list them;
- `GET /v1/{name=projects/*/assets/**}` — an asset's metadata (`ee.data.getAsset`).

The export's expression is evaluated here, well enough for what ingest submits: an image
collection filtered by date, bands selected, composited by a reducer, clipped to a region and
sampled at labelled points (`Image.sampleRegions`). The catalogue is synthetic: one
Sentinel-2-like collection and one labelled-fields table, with band values that depend on each
point's class (deterministically) so a classifier can learn them. The CSV is written into the
GCS emulator at the requested prefix after `export_seconds`.

Every rule and its source are listed in docs/earthengine-standin.md; comments name the rule.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from google.auth.credentials import AnonymousCredentials

if TYPE_CHECKING:
    from google.cloud import storage as gcs

from mlpipe_ops.standins.google_api import (
    ApiError,
    close,
    dumps,
    json_handler,
    serve,
    timestamp,
)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
METADATA_TYPE = "type.googleapis.com/google.earthengine.v1.OperationMetadata"
# Rule 9: the states of an operation's metadata.
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
SYNTHETIC_S2 = "MLPIPE/SYNTHETIC/S2_SR"
SYNTHETIC_FIELDS = "MLPIPE/SYNTHETIC/CROP_FIELDS"
S2_BANDS = ("B2", "B3", "B4", "B8", "B11", "B12")
CROPS = ("corn", "wheat", "soy", "barley")
# The synthetic collection's footprint (lon_min, lat_min, lon_max, lat_max): outside it there
# are no pixels, so a sample point there yields no row (rule 17).
FOOTPRINT = (4.0, 50.0, 6.0, 53.0)
# Failure modes a test can switch on for the next exports (fail_next).
FAILURES = ("quota", "export_failed", "never_finish", "quota_on_poll")


class EvaluationError(Exception):
    """An expression that Earth Engine would refuse while running the export."""


# --- the catalogue ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageCollectionAsset:
    asset_id: str
    bands: tuple[str, ...]
    dates: tuple[dt.date, ...]
    footprint: tuple[float, float, float, float]


@dataclass(frozen=True)
class TableAsset:
    asset_id: str
    features: tuple[dict[str, Any], ...]  # GeoJSON Point features


def synthetic_fields(count: int, seed: int = 11) -> tuple[dict[str, Any], ...]:
    """`count` labelled fields inside the footprint: field_id, region (by latitude), crop."""
    rnd = random.Random(seed)
    lon0, lat0, lon1, lat1 = FOOTPRINT
    out = []
    for i in range(count):
        lon = round(rnd.uniform(lon0 + 0.01, lon1 - 0.01), 6)
        lat = round(rnd.uniform(lat0 + 0.01, lat1 - 0.01), 6)
        region = "south" if lat < lat0 + 1 else "central" if lat < lat0 + 2 else "north"
        out.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [lon, lat]},
                "properties": {
                    "field_id": f"f{i + 1:06d}",
                    "region": region,
                    "crop": CROPS[rnd.randrange(len(CROPS))],
                },
            }
        )
    return tuple(out)


@dataclass
class Catalogue:
    collections: dict[str, ImageCollectionAsset] = field(default_factory=dict)
    tables: dict[str, TableAsset] = field(default_factory=dict)

    @classmethod
    def synthetic(cls, fields: int = 1200) -> Catalogue:
        start = dt.date(2025, 1, 1)
        dates = tuple(start + dt.timedelta(days=5 * i) for i in range(146))  # every 5 days, 2 years
        return cls(
            {SYNTHETIC_S2: ImageCollectionAsset(SYNTHETIC_S2, S2_BANDS, dates, FOOTPRINT)},
            {SYNTHETIC_FIELDS: TableAsset(SYNTHETIC_FIELDS, synthetic_fields(fields))},
        )


# --- the expression's values ------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    asset: str
    bands: tuple[str, ...]
    available: tuple[str, ...]
    dates: tuple[dt.date, ...]
    footprint: tuple[float, float, float, float]
    reducer: str = ""
    region: Any = None  # a GeoJSON Polygon the image is clipped to


@dataclass(frozen=True)
class ImageList:
    images: tuple[Image, ...]


@dataclass(frozen=True)
class DateFilter:
    start: dt.date
    end: dt.date


@dataclass(frozen=True)
class Function:
    arguments: tuple[str, ...]
    body: str


def _date(value: Any) -> dt.date:
    if isinstance(value, int | float):  # milliseconds since the epoch
        return dt.datetime.fromtimestamp(value / 1000, dt.UTC).date()
    return dt.date.fromisoformat(str(value)[:10])


def point_in_polygon(lon: float, lat: float, polygon: dict[str, Any]) -> bool:
    """Ray casting on the polygon's outer ring (rule 18: sampling is limited to the clip)."""
    ring = polygon["coordinates"][0]
    inside = False
    for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1], strict=True):
        if (y0 > lat) != (y1 > lat) and lon < (x1 - x0) * (lat - y0) / (y1 - y0) + x0:
            inside = not inside
    return inside


def class_center(label: str, band: str) -> float:
    """The mean reflectance of a class in a band: from a hash, spread over 1000-3000 (with
    the pixel noise, four classes are told apart about 97% of the time, not always)."""
    digest = hashlib.sha256(f"{label}|{band}".encode()).digest()
    return 1000.0 + int.from_bytes(digest[:4], "big") % 2000


def pixel_value(label: str, band: str, lon: float, lat: float, image: Image, scale: float) -> float:
    """A deterministic reflectance at a pixel: its class's centre plus pixel noise (rule 19)."""
    metres = 111_320.0
    px = math.floor(lon * metres * math.cos(math.radians(lat)) / scale)
    py = math.floor(lat * metres / scale)
    seed = hashlib.sha256(f"{px}|{py}|{band}|{image.reducer}|{len(image.dates)}".encode()).digest()
    u1 = (int.from_bytes(seed[:4], "big") + 1) / 2**32
    u2 = int.from_bytes(seed[4:8], "big") / 2**32
    noise = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
    shift = {"min": -120.0, "max": 120.0, "mean": 10.0}.get(image.reducer, 0.0)
    center = class_center(label, band) if label else 2000.0
    return round(center + shift + 350.0 * noise, 1)


class Evaluator:
    """The part of the Earth Engine expression language ingest's exports use (rule 12)."""

    def __init__(self, catalogue: Catalogue, expression: dict[str, Any]) -> None:
        self.catalogue = catalogue
        self.values = expression.get("values", {})
        self.result = expression.get("result", "")

    def run(self) -> Any:
        if self.result not in self.values:
            raise EvaluationError("the expression has no result value")
        return self.node(self.values[self.result], {})

    def node(self, node: dict[str, Any], scope: dict[str, Any]) -> Any:
        if "constantValue" in node:
            return node["constantValue"]
        if "valueReference" in node:
            return self.node(self.values[node["valueReference"]], scope)
        if "arrayValue" in node:
            return [self.node(v, scope) for v in node["arrayValue"].get("values", [])]
        if "dictionaryValue" in node:
            return {k: self.node(v, scope) for k, v in node["dictionaryValue"]["values"].items()}
        if "argumentReference" in node:
            return scope[node["argumentReference"]]
        if "functionDefinitionValue" in node:
            fn = node["functionDefinitionValue"]
            return Function(tuple(fn["argumentNames"]), fn["body"])
        if "functionInvocationValue" in node:
            call = node["functionInvocationValue"]
            name = call.get("functionName", "")
            args = {k: self.node(v, scope) for k, v in call.get("arguments", {}).items()}
            handler = FUNCTIONS.get(name)
            if handler is None:
                raise EvaluationError(f"Unknown algorithm: {name}")
            return handler(self, args)
        raise EvaluationError(f"cannot evaluate {sorted(node)}")

    def apply(self, fn: Function, value: Any) -> Any:
        return self.node(self.values[fn.body], dict(zip(fn.arguments, [value], strict=False)))


def _load_collection(ev: Evaluator, a: dict[str, Any]) -> ImageList:
    asset = ev.catalogue.collections.get(str(a["id"]))
    if asset is None:  # rule 14
        raise EvaluationError(f"ImageCollection.load: ImageCollection asset '{a['id']}' not found.")
    return ImageList(
        tuple(
            Image(asset.asset_id, asset.bands, asset.bands, (d,), asset.footprint)
            for d in asset.dates
        )
    )


def _load_image(ev: Evaluator, a: dict[str, Any]) -> Image:
    asset_id = str(a["id"])
    base, _, day = asset_id.rpartition("/")
    collection = ev.catalogue.collections.get(base)
    found = collection is not None and any(d.strftime("%Y%m%d") == day for d in collection.dates)
    if not found or collection is None:  # rule 14
        raise EvaluationError(f"Image.load: Image asset '{asset_id}' not found.")
    return Image(asset_id, collection.bands, collection.bands, (_date(day),), collection.footprint)


def _load_table(ev: Evaluator, a: dict[str, Any]) -> list[dict[str, Any]]:
    asset = ev.catalogue.tables.get(str(a["tableId"]))
    if asset is None:  # rule 14
        raise EvaluationError(f"Collection.loadTable: Collection asset '{a['tableId']}' not found.")
    return list(asset.features)


def _filter(ev: Evaluator, a: dict[str, Any]) -> ImageList:
    coll, flt = a["collection"], a["filter"]
    if not isinstance(coll, ImageList) or not isinstance(flt, DateFilter):
        raise EvaluationError("Collection.filter: only date filters on image collections")
    return ImageList(
        tuple(i for i in coll.images if all(flt.start <= d < flt.end for d in i.dates))
    )


def _date_range(ev: Evaluator, a: dict[str, Any]) -> DateFilter:
    return DateFilter(_date(a["start"]), _date(a["end"]))


def _date_range_contains(ev: Evaluator, a: dict[str, Any]) -> DateFilter:
    if a.get("rightField") != "system:time_start" or not isinstance(a["leftValue"], DateFilter):
        raise EvaluationError("Filter.dateRangeContains: a DateRange and system:time_start")
    return a["leftValue"]


def _map(ev: Evaluator, a: dict[str, Any]) -> ImageList:
    coll, fn = a["collection"], a["baseAlgorithm"]
    return ImageList(tuple(ev.apply(fn, image) for image in coll.images))


def _select(ev: Evaluator, a: dict[str, Any]) -> Image:
    image: Image = a["input"]
    wanted = [str(b) for b in a["bandSelectors"]]
    for band in wanted:
        if band not in image.available:  # rule 15
            raise EvaluationError(
                f"Image.select: Pattern '{band}' did not match any bands. Available bands: "
                f"[{', '.join(image.available)}]"
            )
    return Image(image.asset, tuple(wanted), image.available, image.dates, image.footprint)


def _reducer(name: str) -> Callable[[Evaluator, dict[str, Any]], Image]:
    def reduce(ev: Evaluator, a: dict[str, Any]) -> Image:
        coll: ImageList = a["collection"]
        if not coll.images:  # rule 16
            raise EvaluationError(
                f"reduce.{name}: the collection is empty (no image in the date range), so "
                "the composite has no bands."
            )
        first = coll.images[0]
        dates = tuple(d for i in coll.images for d in i.dates)
        return Image(first.asset, first.bands, first.bands, dates, first.footprint, name)

    return reduce


def _clip(ev: Evaluator, a: dict[str, Any]) -> Image:
    image: Image = a["input"]
    return Image(
        image.asset,
        image.bands,
        image.available,
        image.dates,
        image.footprint,
        image.reducer,
        a["geometry"],
    )


def _polygon(ev: Evaluator, a: dict[str, Any]) -> dict[str, Any]:
    coords = a["coordinates"]
    if coords and isinstance(coords[0][0], int | float):
        coords = [coords]
    return {"type": "Polygon", "coordinates": coords}


def _point(ev: Evaluator, a: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Point", "coordinates": a["coordinates"]}


def _geometry(ev: Evaluator, a: dict[str, Any]) -> dict[str, Any]:
    geo = a["geoJson"]
    if not isinstance(geo, dict):
        raise EvaluationError("Geometry: GeoJSON expected")
    return geo


def _feature(ev: Evaluator, a: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "geometry": a.get("geometry"), "properties": a.get("metadata") or {}}


def _collection(ev: Evaluator, a: dict[str, Any]) -> list[dict[str, Any]]:
    return list(a["features"])


def _sample_regions(ev: Evaluator, a: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per sample point with a pixel: the point's properties and the band values
    (rules 17-19)."""
    image: Image = a["image"]
    features: list[dict[str, Any]] = a["collection"]
    properties = a.get("properties")
    scale = float(a.get("scale") or 10.0)
    if scale <= 0:
        raise EvaluationError("Image.sampleRegions: scale must be positive.")
    lon0, lat0, lon1, lat1 = image.footprint
    rows = []
    for feature in features:
        geometry = feature.get("geometry") or {}
        if geometry.get("type") != "Point":
            raise EvaluationError("Image.sampleRegions: only Point samples are supported here")
        lon, lat = (float(c) for c in geometry["coordinates"][:2])
        if not (lon0 <= lon <= lon1 and lat0 <= lat <= lat1):
            continue  # no pixel: masked out of the footprint
        if image.region is not None and not point_in_polygon(lon, lat, image.region):
            continue
        props = feature.get("properties") or {}
        keep = props if properties is None else {k: props.get(k) for k in properties}
        label = str(props.get(label_property(properties, props), ""))
        row = {k: v for k, v in keep.items() if v is not None}
        for band in image.bands:
            row[band] = pixel_value(label, band, lon, lat, image, scale)
        rows.append(row)
    return rows


def label_property(properties: list[str] | None, props: dict[str, Any]) -> str:
    """The property whose value decides a point's synthetic reflectances: the last one
    copied (ingest lists the class last; rule 19, assumed)."""
    names = list(properties) if properties else sorted(props)
    return names[-1] if names else ""


FUNCTIONS: dict[str, Callable[[Evaluator, dict[str, Any]], Any]] = {
    "ImageCollection.load": _load_collection,
    "Image.load": _load_image,
    "Collection.loadTable": _load_table,
    "Collection.filter": _filter,
    "DateRange": _date_range,
    "Filter.dateRangeContains": _date_range_contains,
    "Collection.map": _map,
    "Image.select": _select,
    "Image.clip": _clip,
    "Image.clipToBoundsAndScale": _clip,
    "GeometryConstructors.Polygon": _polygon,
    "GeometryConstructors.Point": _point,
    "Geometry": _geometry,
    "Feature": _feature,
    "Collection": _collection,
    "Image.sampleRegions": _sample_regions,
    **{f"reduce.{r}": _reducer(r) for r in ("median", "mean", "min", "max")},
}


def _arg(name: str, type_: str, optional: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"argumentName": name, "type": type_}
    if optional:
        out["optional"] = True
    return out


# Rule 4: the algorithms the client knows, as projects.algorithms.list describes them; only
# those the evaluator runs.
ALGORITHMS: list[dict[str, Any]] = [
    {"name": f"algorithms/{name}", "returnType": ret, "arguments": args, "description": ""}
    for name, ret, args in (
        (
            "ImageCollection.load",
            "ImageCollection",
            [_arg("id", "String"), _arg("version", "Long", True)],
        ),
        ("Image.load", "Image", [_arg("id", "String"), _arg("version", "Long", True)]),
        (
            "Collection.loadTable",
            "FeatureCollection",
            [
                _arg("tableId", "String"),
                _arg("geometryColumn", "String", True),
                _arg("version", "Long", True),
            ],
        ),
        (
            "Collection.filter",
            "FeatureCollection",
            [_arg("collection", "FeatureCollection"), _arg("filter", "Object")],
        ),
        (
            "Collection.map",
            "FeatureCollection",
            [
                _arg("collection", "FeatureCollection"),
                _arg("baseAlgorithm", "Algorithm"),
                _arg("dropNulls", "Boolean", True),
            ],
        ),
        (
            "DateRange",
            "DateRange",
            [
                _arg("start", "Object"),
                _arg("end", "Object", True),
                _arg("timeZone", "String", True),
            ],
        ),
        (
            "Filter.dateRangeContains",
            "Filter",
            [
                _arg("leftField", "String", True),
                _arg("rightValue", "Object", True),
                _arg("rightField", "String", True),
                _arg("leftValue", "Object", True),
            ],
        ),
        (
            "Image.select",
            "Image",
            [_arg("input", "Image"), _arg("bandSelectors", "List"), _arg("newNames", "List", True)],
        ),
        ("Image.clip", "Image", [_arg("input", "Image"), _arg("geometry", "Object")]),
        (
            "Image.sampleRegions",
            "FeatureCollection",
            [
                _arg("image", "Image"),
                _arg("collection", "FeatureCollection"),
                _arg("properties", "List", True),
                _arg("scale", "Float", True),
                _arg("projection", "Projection", True),
                _arg("tileScale", "Float", True),
                _arg("geometries", "Boolean", True),
            ],
        ),
        (
            "Feature",
            "Feature",
            [_arg("geometry", "Geometry", True), _arg("metadata", "Dictionary", True)],
        ),
        ("Collection", "FeatureCollection", [_arg("features", "List")]),
        (
            "GeometryConstructors.Point",
            "Geometry",
            [_arg("coordinates", "List"), _arg("crs", "Projection", True)],
        ),
        (
            "GeometryConstructors.Polygon",
            "Geometry",
            [
                _arg("coordinates", "List"),
                _arg("crs", "Projection", True),
                _arg("geodesic", "Boolean", True),
                _arg("maxError", "ErrorMargin", True),
                _arg("evenOdd", "Boolean", True),
            ],
        ),
        *(
            (f"reduce.{r}", "Image", [_arg("collection", "ImageCollection")])
            for r in ("median", "mean", "min", "max")
        ),
    )
]


# --- the discovery document -------------------------------------------------------------------
def _method(
    resource: str,
    verb: str,
    http: str,
    path: str,
    param: str,
    pattern: str,
    body: bool,
    query: tuple[str, ...] = (),
) -> tuple[str, str, dict[str, Any]]:
    params: dict[str, Any] = {
        param: {"location": "path", "required": True, "type": "string", "pattern": pattern}
    }
    for q in query:
        params[q] = {"location": "query", "type": "integer" if q == "pageSize" else "string"}
    method: dict[str, Any] = {
        "id": f"earthengine.projects.{resource}.{verb}",
        "path": path,
        "flatPath": path,
        "httpMethod": http,
        "parameters": params,
        "parameterOrder": [param],
        "response": {"type": "any"},
    }
    if body:
        method["request"] = {"type": "any"}
    return resource, verb, method


# Rule 1: the methods the client calls, with the v1 reference's HTTP mappings.
METHODS = (
    _method(
        "algorithms", "list", "GET", "v1/{+parent}/algorithms", "parent", "^projects/[^/]+$", False
    ),
    _method(
        "table", "export", "POST", "v1/{+project}/table:export", "project", "^projects/[^/]+$", True
    ),
    _method(
        "operations", "get", "GET", "v1/{+name}", "name", "^projects/[^/]+/operations/.*$", False
    ),
    _method(
        "operations",
        "cancel",
        "POST",
        "v1/{+name}:cancel",
        "name",
        "^projects/[^/]+/operations/.*$",
        True,
    ),
    _method(
        "operations",
        "list",
        "GET",
        "v1/{+name}/operations",
        "name",
        "^projects/[^/]+$",
        False,
        ("pageSize", "pageToken", "filter"),
    ),
    _method("assets", "get", "GET", "v1/{+name}", "name", "^projects/[^/]+/assets/.*$", False),
)


def discovery_document(root_url: str) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    for resource, verb, method in METHODS:
        resources.setdefault(resource, {"methods": {}})["methods"][verb] = method
    standard = {
        name: {"location": "query", "type": kind}
        for name, kind in (
            ("prettyPrint", "boolean"),
            ("alt", "string"),
            ("fields", "string"),
            ("key", "string"),
            ("quotaUser", "string"),
            ("$.xgafv", "string"),
        )
    }
    return {
        "kind": "discovery#restDescription",
        "discoveryVersion": "v1",
        "id": "earthengine:v1",
        "name": "earthengine",
        "version": "v1",
        "protocol": "rest",
        "rootUrl": root_url,
        "servicePath": "",
        "baseUrl": root_url,
        "batchPath": "batch",
        "parameters": standard,
        "schemas": {},
        "resources": {"projects": {"resources": resources}},
    }


# --- operations -------------------------------------------------------------------------------
@dataclass
class Operation:
    name: str
    description: str
    created: str
    state: str = "PENDING"
    updated: str = ""
    started: str = ""
    ended: str = ""
    error: dict[str, Any] | None = None
    destination: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "@type": METADATA_TYPE,
            "state": self.state,
            "description": self.description,
            "type": "EXPORT_FEATURES",  # rule 9
            "createTime": self.created,
            "updateTime": self.updated or self.created,
            "attempt": 1,
        }
        if self.started:
            metadata["startTime"] = self.started
        if self.ended:
            metadata["endTime"] = self.ended
        if self.state == "SUCCEEDED" and self.destination:
            metadata["destinationUris"] = [self.destination]
        out: dict[str, Any] = {
            "name": self.name,
            "metadata": metadata,
            "done": self.state in TERMINAL,
        }
        if self.state in TERMINAL:  # rule 10
            if self.error is not None:
                out["error"] = self.error
            else:
                out["response"] = {"@type": "type.googleapis.com/google.protobuf.Empty"}
        return out


class EarthEngineStandIn:
    """`start()` serves it on 127.0.0.1 in a thread; `stop()` ends it. `fail_next(mode, n)`
    makes the next n exports fail one way (FAILURES); `requests` logs every call received."""

    def __init__(
        self,
        project_id: str = "mlpipe-local",
        *,
        port: int = 0,
        storage_emulator_host: str = "",
        export_seconds: float = 0.2,
        catalogue: Catalogue | None = None,
    ) -> None:
        self.project_id = project_id
        self.port = port
        self.export_seconds = export_seconds
        self.catalogue = catalogue or Catalogue.synthetic()
        # Locally, Cloud Storage is the emulator: the stand-in never writes anywhere else.
        self.storage_emulator_host = storage_emulator_host or os.environ.get(
            "STORAGE_EMULATOR_HOST", ""
        )
        self.requests: list[tuple[str, str]] = []
        self._failures: deque[str] = deque()
        self._poll_quota = 0
        self._lock = threading.RLock()
        self._operations: dict[str, Operation] = {}
        self._by_request: dict[tuple[str, str], str] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._storage: gcs.Client | None = None

    # --- life cycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> EarthEngineStandIn:
        handler = json_handler(self, "earth engine", ("GET", "POST", "DELETE", "PATCH"))
        self._server = serve(handler, self.port, "ee")
        self.port = self._server.server_address[1]
        log.info("Earth Engine stand-in on %s", self.url)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for op in self._operations.values():
                op.cancel.set()
        close(self._server)
        self._server = None
        for thread in list(self._threads):
            thread.join(timeout=10)

    def __enter__(self) -> EarthEngineStandIn:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def fail_next(self, mode: str, count: int = 1) -> None:
        if mode not in FAILURES:
            raise ValueError(f"failure mode {mode!r}: one of {FAILURES}")
        with self._lock:
            if mode == "quota_on_poll":
                self._poll_quota += count
            else:
                self._failures.extend([mode] * count)

    def operations(self) -> list[dict[str, Any]]:
        with self._lock:
            return [op.to_json() for op in self._operations.values()]

    # --- HTTP ---------------------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, raw_body: bytes) -> tuple[int, bytes]:
        parts = urlsplit(raw_path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        with self._lock:
            self.requests.append((method, path))
        try:
            body = json.loads(raw_body) if raw_body else {}
            return 200, dumps(self._route(method, path, query, body))
        except ApiError as exc:
            return exc.http_status, dumps(exc.body())
        except (ValueError, KeyError, TypeError) as exc:
            return 400, dumps(ApiError("INVALID_ARGUMENT", f"bad request: {exc}").body())

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]
    ) -> Any:
        if path == "/$discovery/rest" and method == "GET":
            if query.get("version", ["v1"])[0] != "v1":
                raise ApiError("NOT_FOUND", "only version v1 is served here")
            return discovery_document(self.url + "/")
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "v1" or parts[1] != "projects":
            raise ApiError("NOT_FOUND", f"no method at {path}")
        project, rest = parts[2], parts[3:]
        if rest == ["algorithms"] and method == "GET":
            return {"algorithms": ALGORITHMS}
        if rest == ["table:export"] and method == "POST":
            return self.export_table(project, body)
        if rest == ["operations"] and method == "GET":
            return {
                "operations": [
                    o for o in self.operations() if o["name"].startswith(f"projects/{project}/")
                ]
            }
        if len(rest) == 2 and rest[0] == "operations":
            op_id, _, verb = rest[1].partition(":")
            name = f"projects/{project}/operations/{op_id}"
            if method == "GET" and not verb:
                return self.get_operation(name)
            if method == "POST" and verb == "cancel":
                return self.cancel_operation(name)
        if rest and rest[0] == "assets" and method == "GET":
            return self.get_asset("/".join(rest[1:]))
        raise ApiError("NOT_FOUND", f"no method {method} {path}")

    # --- methods ------------------------------------------------------------------------------
    def export_table(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            request_id = str(body.get("requestId", ""))
            # Rule 6: a repeated requestId answers the operation it started, whatever else
            # the request says; nothing else is started.
            if request_id and (project, request_id) in self._by_request:
                return self._operations[self._by_request[(project, request_id)]].to_json()
            if self._failures and self._failures[0] == "quota":
                self._failures.popleft()
                # Rule 8: too many tasks queued is RESOURCE_EXHAUSTED (HTTP 429).
                raise ApiError(
                    "RESOURCE_EXHAUSTED",
                    "Too many tasks already in the queue (3000). Please wait for some of them "
                    "to complete.",
                )
            options = body.get("fileExportOptions") or {}
            destination = options.get("cloudStorageDestination") or {}
            if not isinstance(body.get("expression"), dict):  # rule 5
                raise ApiError("INVALID_ARGUMENT", "expression is required")
            if not destination.get("bucket"):
                raise ApiError(
                    "INVALID_ARGUMENT", "only fileExportOptions.cloudStorageDestination is served"
                )
            file_format = options.get("fileFormat", "CSV")
            if file_format != "CSV":
                raise ApiError("INVALID_ARGUMENT", f"fileFormat {file_format}: only CSV is served")
            # Rule 7: the operation's name, projects/<project>/operations/<id>.
            op_id = uuid.uuid4().hex.upper()[:24]
            op = Operation(
                f"projects/{project}/operations/{op_id}",
                str(body.get("description", "")),
                timestamp(),
            )
            mode = self._failures.popleft() if self._failures else ""
            self._operations[op.name] = op
            if request_id:
                self._by_request[(project, request_id)] = op.name
        thread = threading.Thread(
            target=self._run_export,
            args=(op, body, destination, mode),
            name=f"ee-export-{op_id}",
            daemon=True,
        )
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return op.to_json()

    def _set(self, op: Operation, state: str, error: dict[str, Any] | None = None) -> None:
        with self._lock:
            if op.state in TERMINAL:
                return
            op.state = state
            op.updated = timestamp()
            if state == "RUNNING":
                op.started = op.updated
            if state in TERMINAL:
                op.ended = op.updated
                op.error = error

    def _run_export(
        self, op: Operation, body: dict[str, Any], destination: dict[str, Any], mode: str
    ) -> None:
        half = self.export_seconds / 2
        if op.cancel.wait(half):
            return
        self._set(op, "RUNNING")
        if mode == "never_finish":
            op.cancel.wait()
            return
        try:
            rows = Evaluator(self.catalogue, body["expression"]).run()
            if not isinstance(rows, list):
                raise EvaluationError("the expression does not evaluate to a FeatureCollection")
            data = _csv(rows, body.get("selectors"))
        except EvaluationError as exc:
            if not op.cancel.wait(half):
                # Rule 11: an export whose computation fails ends FAILED with the error.
                self._set(op, "FAILED", ApiError("INVALID_ARGUMENT", str(exc)).rpc_status())
            return
        if op.cancel.wait(half):
            return
        if mode == "export_failed":
            self._set(
                op,
                "FAILED",
                ApiError(
                    "INTERNAL", "An internal error has occurred (request: synthetic)."
                ).rpc_status(),
            )
            return
        prefix = str(destination.get("filenamePrefix", ""))
        name = prefix if prefix.endswith(".csv") else prefix + ".csv"  # rule 13
        bucket = str(destination["bucket"])
        try:
            blob = self._client().bucket(bucket).blob(name)
            blob.upload_from_string(data, content_type="text/csv")
        except Exception as exc:  # the destination is not writable: the export fails
            self._set(
                op,
                "FAILED",
                ApiError(
                    "PERMISSION_DENIED", f"cannot write gs://{bucket}/{name}: {exc}"
                ).rpc_status(),
            )
            return
        with self._lock:
            op.destination = f"https://console.developers.google.com/storage/browser/{bucket}/"
        self._set(op, "SUCCEEDED")

    def _client(self) -> gcs.Client:
        if not self.storage_emulator_host:
            raise RuntimeError("no Cloud Storage emulator (STORAGE_EMULATOR_HOST) to write to")
        if self._storage is None:
            # Imported on the first export: the stand-in starts with every local stack, while
            # the services import on the same cores.
            from google.cloud import storage as gcs

            self._storage = gcs.Client(
                project=self.project_id,
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": self.storage_emulator_host},
            )
        return self._storage

    def get_operation(self, name: str) -> dict[str, Any]:
        with self._lock:
            if self._poll_quota > 0:
                self._poll_quota -= 1
                raise ApiError(
                    "RESOURCE_EXHAUSTED",
                    "Quota exceeded for quota metric 'Read requests' (synthetic).",
                )
            op = self._operations.get(name)
            if op is None:  # rule 7
                raise ApiError("NOT_FOUND", f"Operation {name} not found.")
            return op.to_json()

    def cancel_operation(self, name: str) -> dict[str, Any]:
        with self._lock:
            op = self._operations.get(name)
            if op is None:
                raise ApiError("NOT_FOUND", f"Operation {name} not found.")
            if op.state not in TERMINAL:
                op.cancel.set()
                # Rule 10: a cancelled operation is done with error code 1 (CANCELLED).
                self._set(op, "CANCELLED", ApiError("CANCELLED", "Cancelled.").rpc_status())
        return {}

    def get_asset(self, name: str) -> dict[str, Any]:
        # Rule 3: assets are named projects/<project>/assets/<id>; the public catalogue's
        # are under projects/earthengine-public/assets/.
        asset_id = name.split("/assets/", 1)[-1] if "/assets/" in name else name
        if asset_id in self.catalogue.collections:
            return {
                "type": "IMAGE_COLLECTION",
                "name": f"projects/earthengine-public/assets/{asset_id}",
                "id": asset_id,
            }
        if asset_id in self.catalogue.tables:
            return {
                "type": "TABLE",
                "name": f"projects/earthengine-public/assets/{asset_id}",
                "id": asset_id,
            }
        raise ApiError("NOT_FOUND", f"Asset '{asset_id}' not found.")

    def wait_all(self, timeout: float = 10.0) -> None:
        """Wait until no export runs (for tests)."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


def _csv(rows: list[dict[str, Any]], selectors: list[str] | None) -> bytes:
    """The table as CSV: the selectors' columns in order, else system:index, the properties
    sorted, and .geo (rule 13)."""
    if selectors:
        header = list(selectors)
        indexed = False
    else:
        header = ["system:index", *sorted({k for r in rows for k in r}), ".geo"]
        indexed = True
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for i, row in enumerate(rows):
        values = dict(row)
        if indexed:
            values["system:index"] = f"{i}_0"
            values[".geo"] = ""
        writer.writerow(["" if values.get(c) is None else values.get(c) for c in header])
    return out.getvalue().encode()


def main(argv: list[str] | None = None) -> None:
    """`python -m mlpipe_ops.standins.earthengine`: serve until SIGTERM or Ctrl-C (the local
    stack starts it so; Cloud Storage is the emulator STORAGE_EMULATOR_HOST names)."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--project", default=os.environ.get("MLPIPE_PROJECT", "mlpipe-local"))
    parser.add_argument("--export-seconds", type=float, default=1.0)
    parser.add_argument("--fields", type=int, default=1200, help="labelled fields in the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    standin = EarthEngineStandIn(
        args.project,
        port=args.port,
        export_seconds=args.export_seconds,
        catalogue=Catalogue.synthetic(args.fields),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    standin.start()
    print(standin.url, flush=True)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()


if __name__ == "__main__":
    main()
