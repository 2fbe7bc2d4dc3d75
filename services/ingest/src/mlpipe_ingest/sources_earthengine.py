"""Earth Engine as a source: export a sampled image's bands to Cloud Storage as CSV, wait for
the export task, and hand the file to ingest's `gcs` source.

The export request is built as plain data by a pure function (the keyword arguments of
`ee.batch.Export.table.toCloudStorage`), and the task is driven through the small
`EarthEngineTasks` interface, so the polling is tested with scripted task states. The only
implementation that would talk to Earth Engine, `EeTasks`, needs `earthengine-api`, which is
not a dependency of this project: it is NOT wired or tested against the real service.
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mlpipe.errors import PermanentError, TransientError
from mlpipe.runtime.failures import FailureReporter
from mlpipe.v1 import events_pb2

BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
ASSET = re.compile(r"^[A-Za-z0-9_./-]+$")
DONE, FAILED = "COMPLETED", ("FAILED", "CANCELLED", "CANCEL_REQUESTED")


@dataclass(frozen=True)
class ExportSpec:
    asset: str  # an image asset id, e.g. "COPERNICUS/S2_SR_HARMONIZED/20260601T..."
    bands: tuple[str, ...]
    scale: float  # metres per pixel sampled
    region: tuple[tuple[float, float], ...]  # a polygon's (lon, lat) ring
    bucket: str
    file_prefix: str  # objects are written as <prefix>.csv (or numbered shards)
    file_format: str = "CSV"


def build_export_request(spec: ExportSpec) -> dict[str, Any]:
    """The keyword arguments of `ee.batch.Export.table.toCloudStorage`, as plain data.

    `collection` describes the ee expression to build: the image, its bands selected, sampled
    at `scale` over `region` with geometries dropped (one row per pixel).
    """
    problems = []
    if not ASSET.match(spec.asset):
        problems.append(f"asset {spec.asset!r} is not an asset id")
    if not spec.bands or not all(re.fullmatch(r"[A-Za-z0-9_]+", b) for b in spec.bands):
        problems.append(f"bands {list(spec.bands)} must be one or more band names")
    if spec.scale <= 0:
        problems.append(f"scale {spec.scale} must be positive")
    if len(spec.region) < 3 or any(
        not (-180 <= lon <= 180 and -90 <= lat <= 90) for lon, lat in spec.region
    ):
        problems.append("region must be a ring of 3+ (lon, lat) points")
    if not BUCKET.match(spec.bucket):
        problems.append(f"bucket {spec.bucket!r} is not a bucket name")
    if not spec.file_prefix or ".." in spec.file_prefix.split("/") or spec.file_prefix[0] == "/":
        problems.append(f"file prefix {spec.file_prefix!r} is not a safe object prefix")
    if spec.file_format != "CSV":
        problems.append(f"file format {spec.file_format!r}: ingest reads CSV exports")
    if problems:
        raise PermanentError("invalid_export", "earth engine export: " + "; ".join(problems))
    ring = [list(p) for p in spec.region]
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    return {
        "collection": {
            "image": spec.asset,
            "select": list(spec.bands),
            "sample": {
                "region": {"type": "Polygon", "coordinates": [ring]},
                "scale": spec.scale,
                "geometries": False,
            },
        },
        "description": re.sub(r"[^A-Za-z0-9_-]", "_", spec.file_prefix)[:100],
        "bucket": spec.bucket,
        "fileNamePrefix": spec.file_prefix,
        "fileFormat": spec.file_format,
        "selectors": list(spec.bands),
    }


class EarthEngineTasks(Protocol):
    def start(self, request: dict[str, Any]) -> str:
        """Start the export; return the task id."""
        ...

    def status(self, task_id: str) -> dict[str, Any]:
        """The task's status: {"state": ..., "error_message": ..., "destination_uris": [...]}"""
        ...


class EeTasks:
    """Earth Engine's own client behind `EarthEngineTasks`. Not wired: earthengine-api is not
    installed here; this is the mapping it would use."""

    def __init__(self) -> None:
        self.ee = importlib.import_module("ee")  # ModuleNotFoundError without earthengine-api
        self._tasks: dict[str, Any] = {}

    def start(self, request: dict[str, Any]) -> str:
        ee = self.ee
        spec = request["collection"]
        sample = spec["sample"]
        collection = (
            ee.Image(spec["image"])
            .select(spec["select"])
            .sample(
                region=ee.Geometry(sample["region"]),
                scale=sample["scale"],
                geometries=sample["geometries"],
            )
        )
        task = ee.batch.Export.table.toCloudStorage(
            collection=collection, **{k: v for k, v in request.items() if k != "collection"}
        )
        task.start()
        self._tasks[task.id] = task
        return str(task.id)

    def status(self, task_id: str) -> dict[str, Any]:
        return dict(self._tasks[task_id].status())


def wait_for_export(
    tasks: EarthEngineTasks,
    task_id: str,
    *,
    timeout: float,
    poll: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Poll until the task completes (return its gs:// files) or fails or `timeout` passes."""
    deadline = clock() + timeout
    last = "UNSUBMITTED"
    while True:
        try:
            status = tasks.status(task_id)
        except (ConnectionError, TimeoutError) as exc:
            raise TransientError(f"earth engine task {task_id}: status unavailable: {exc}") from exc
        last = str(status.get("state", "UNKNOWN"))
        if last == DONE:
            uris = [str(u) for u in status.get("destination_uris", [])]
            if not uris:
                raise PermanentError(
                    "ee_no_output", f"earth engine task {task_id} completed without files"
                )
            return uris
        if last in FAILED:
            raise PermanentError(
                "ee_task_failed",
                f"earth engine task {task_id} is {last}: "
                f"{status.get('error_message') or 'no error message'}",
            )
        if clock() >= deadline:
            raise PermanentError(
                "ee_timeout",
                f"earth engine task {task_id} still {last} after {timeout:.0f}s",
            )
        sleep(poll)


def export(
    tasks: EarthEngineTasks,
    spec: ExportSpec,
    failures: FailureReporter,
    context: events_pb2.RunContext | None = None,
    **wait: Any,
) -> list[str] | None:
    """Run one export; its files, or None after publishing PipelineFailed naming the task."""
    try:
        request = build_export_request(spec)
        task_id = tasks.start(request)
        return wait_for_export(tasks, task_id, **wait)
    except PermanentError as exc:
        failures.report(reason=exc.reason, message=exc.message, context=context)
        return None
