"""What a run cost, estimated from its records: each step's recorded duration times the size
of what ran it, at list prices (infra/prices.yaml), plus the objects it keeps in the bucket.

An estimate from step durations is not a bill. Cloud Run bills instance time, each billed
period rounded up to 100 ms (cloud.google.com/run/pricing); an instance-based (CPU always
allocated) instance is billed for its whole lifetime, idle minutes before scale-down
included, and a request-based one for start-up and shut-down too
(cloud.google.com/run/docs/configuring/billing-settings); one instance may serve several
runs at once (concurrency); free tiers and discounts apply per billing account. A step's
duration here is the time between the events its neighbours recorded, so it also holds the
Pub/Sub hop that delivered its input, and a Vertex AI job's provisioning
(cloud.google.com/vertex-ai/pricing bills machine time). The real figures are in the billing
export, by label (docs/cost.md).

`estimate` is pure (records, sizes and prices are given); `run_cost_inputs` reads them from
the bucket. The service that ends a run records its estimate as runs/<id>/cost.json
(`record_estimate`, which never fails the run: without one, the record says why); readers
take that record (`read_record`) and compute on read only for runs that have none.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlpipe.store import layout
from mlpipe.store.layout import RunPaths
from mlpipe.store.run_records import when
from mlpipe.store.storage import Storage

log = logging.getLogger(__name__)

GIB = 1024**3
STEPS = ("ingest", "trainer", "training job", "evaluator", "deployer")
# Vertex AI's default when a config names no machine (mlpipe.ml.config.VertexTrainingSpec).
DEFAULT_MACHINE_TYPE = "n1-standard-4"


class CostInputError(ValueError):
    """The price table lacks an entry an estimate needs (the message names it by its dotted
    path, e.g. vertex_training.machine_types.n1-highmem-2), or a service has no size."""


@dataclass(frozen=True)
class ServiceSize:
    """What one service's Cloud Run instance has (infra/runtime.yaml)."""

    cpu: float
    memory_gib: float
    cpu_always_allocated: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "memory_gib": self.memory_gib,
            "cpu_always_allocated": self.cpu_always_allocated,
        }


def sizes_to_json(sizes: Mapping[str, ServiceSize]) -> str:
    """Every service's size as compact JSON: how the console, which may not read
    infra/runtime.yaml's loader, is told them (MLPIPE_COST_SIZES)."""
    return json.dumps({k: v.to_dict() for k, v in sorted(sizes.items())}, separators=(",", ":"))


def sizes_from_json(text: str) -> dict[str, ServiceSize]:
    raw = json.loads(text)
    return {
        name: ServiceSize(
            cpu=float(size["cpu"]),
            memory_gib=float(size["memory_gib"]),
            cpu_always_allocated=bool(size["cpu_always_allocated"]),
        )
        for name, size in raw.items()
    }


@dataclass(frozen=True)
class PriceTable:
    """infra/prices.yaml: every leaf is {price, source, assumed?}, looked up by dotted path."""

    as_of: str
    currency: str
    region: str
    entries: Mapping[str, Any]

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> PriceTable:
        missing = [key for key in ("as_of", "currency", "region") if not raw.get(key)]
        if missing:
            raise CostInputError(f"price table: {missing[0]}: required key missing")
        return cls(str(raw["as_of"]), str(raw["currency"]), str(raw["region"]), raw)

    def to_json(self) -> str:
        return json.dumps(self.entries, separators=(",", ":"), default=str)

    def entry(self, path: str) -> Mapping[str, Any]:
        node: Any = self.entries
        for key in path.split("."):
            if not isinstance(node, Mapping) or key not in node:
                raise CostInputError(f"price table ({self.region}, {self.as_of}) has no {path}")
            node = node[key]
        if not isinstance(node, Mapping) or not isinstance(node.get("price"), int | float):
            raise CostInputError(f"price table: {path}: expected a mapping with a number price")
        return node

    def price(self, path: str) -> float:
        return float(self.entry(path)["price"])

    def is_assumed(self, path: str) -> bool:
        return bool(self.entry(path).get("assumed"))


@dataclass(frozen=True)
class StepCost:
    step: str
    seconds: float
    cost: float
    basis: str  # what it was priced as, e.g. "Cloud Run 2 vCPU 2 GiB instance-based"
    vcpu_seconds: float | None = None
    gib_seconds: float | None = None
    machine_hours: float | None = None
    accelerator_hours: float | None = None


@dataclass(frozen=True)
class RunCost:
    run_id: str
    steps: list[StepCost]
    storage_bytes: int
    storage_objects: int
    storage_cost: float
    currency: str
    as_of: str
    region: str
    assumed: list[str] = field(default_factory=list)  # price entries marked assumed, used here
    missing: list[str] = field(default_factory=list)  # steps that could not be estimated

    @property
    def total(self) -> float:
        return sum(s.cost for s in self.steps) + self.storage_cost


@dataclass(frozen=True)
class _Job:
    backend: str  # "local" or "vertex"
    machine_type: str = ""
    accelerator_type: str = ""
    accelerator_count: int = 0


def _job_of(records: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> _Job:
    """How the job ran: started.json's backend (the trainer decided it), the machine from the
    run's config snapshot."""
    started = records.get("started.json") or {}
    backend = str(started.get("training_backend", "")).removeprefix("TRAINING_BACKEND_").lower()
    backend = backend or str(started.get("backend", "")) or "local"
    if backend != "vertex":
        return _Job("local")
    vertex = (config.get("training") or {}).get("vertex") or {}
    return _Job(
        "vertex",
        str(vertex.get("machine_type") or DEFAULT_MACHINE_TYPE),
        str(vertex.get("accelerator_type") or ""),
        int(vertex.get("accelerator_count") or 0),
    )


def _event_time(records: Mapping[str, Mapping[str, Any]], name: str) -> dt.datetime | None:
    """When the event recorded as `name` was published (its context's event_time)."""
    return when(((records.get(name) or {}).get("context") or {}).get("event_time"))


def _edges(records: Mapping[str, Mapping[str, Any]]) -> dict[str, dt.datetime | None]:
    """The recorded instants between steps (run_records.timeline_of reads the same fields)."""
    first = records.get("started.json") or records.get("training.json") or {}
    trained = records.get("training.json") or {}
    return {
        "requested": when((first.get("context") or {}).get("requested_at")),
        "landed": when((first.get("dataset") or {}).get("landed_at")),
        "job started": _event_time(records, "started.json"),
        # TrainingCompleted's publication ends the job; its fit's end when that is absent.
        "trained": _event_time(records, "training.json") or when(trained.get("finished_at")),
        "evaluated": _event_time(records, "evaluation.json"),
        "decided": _event_time(records, "deployment.json"),
    }


# Each step runs from one recorded instant to the next, and which record holds the end.
_SPANS = {
    "ingest": ("requested", "landed", "started.json or training.json"),
    "trainer": ("landed", "job started", "started.json"),
    "training job": ("job started", "trained", "training.json"),
    "evaluator": ("trained", "evaluated", "evaluation.json"),
    "deployer": ("evaluated", "decided", "deployment.json"),
}


def _cloud_run(
    step: str, seconds: float, size: ServiceSize, prices: PriceTable, used: set[str]
) -> StepCost:
    tier = "instance_based" if size.cpu_always_allocated else "request_based"
    vcpu_key, gib_key = f"cloud_run.{tier}.vcpu_second", f"cloud_run.{tier}.gib_second"
    used |= {vcpu_key, gib_key}
    vcpu_seconds, gib_seconds = size.cpu * seconds, size.memory_gib * seconds
    return StepCost(
        step=step,
        seconds=seconds,
        cost=vcpu_seconds * prices.price(vcpu_key) + gib_seconds * prices.price(gib_key),
        basis=f"Cloud Run {size.cpu:g} vCPU {size.memory_gib:g} GiB {tier.replace('_', '-')}",
        vcpu_seconds=vcpu_seconds,
        gib_seconds=gib_seconds,
    )


def _vertex(seconds: float, job: _Job, prices: PriceTable, used: set[str]) -> StepCost:
    machine_key = f"vertex_training.machine_types.{job.machine_type}"
    keys = [machine_key]
    hourly = prices.price(machine_key)
    basis = f"Vertex AI {job.machine_type}"
    hours = seconds / 3600
    accelerator_hours = None
    if job.accelerator_type and job.accelerator_count:
        accelerator_key = f"vertex_training.accelerators.{job.accelerator_type}"
        keys.append(accelerator_key)
        hourly += job.accelerator_count * prices.price(accelerator_key)
        basis += f" + {job.accelerator_count} x {job.accelerator_type}"
        accelerator_hours = job.accelerator_count * hours
    used |= set(keys)
    return StepCost(
        "training job",
        seconds,
        hours * hourly,
        basis,
        machine_hours=hours,
        accelerator_hours=accelerator_hours,
    )


def estimate(
    run_id: str,
    records: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any],
    sizes: Mapping[str, ServiceSize],
    objects: Mapping[str, int],
    prices: PriceTable,
    steps_of: tuple[str, ...] = STEPS,
) -> RunCost:
    """The estimate of one run from its records by file name (started.json, training.json,
    evaluation.json, deployment.json), its config snapshot (config.json), each service's size,
    its objects under runs/<id>/ (name → bytes) and the price table.

    A step whose start or end is not recorded is left out and named in `missing`; a local
    job runs inside the trainer's instance and is priced at the trainer's size. Raises
    CostInputError naming an entry the table lacks. `steps_of` limits it to some steps (the
    evaluator's report estimates the steps before the deployer's)."""
    edges = _edges(records)
    job = _job_of(records, config)
    used: set[str] = set()
    steps, missing = [], []
    for step, (start_key, end_key, record) in _SPANS.items():
        if step not in steps_of:
            continue
        start, end = edges[start_key], edges[end_key]
        if start is None or end is None:
            missing.append(f"{step}: not recorded (needs {record})")
            continue
        seconds = max((end - start).total_seconds(), 0.0)
        if step == "training job" and job.backend == "vertex":
            steps.append(_vertex(seconds, job, prices, used))
            continue
        service = "trainer" if step == "training job" else step
        if service not in sizes:
            raise CostInputError(f"no size for service {service} (MLPIPE_COST_SIZES)")
        steps.append(_cloud_run(step, seconds, sizes[service], prices, used))
    stored = sum(objects.values())
    storage_keys = ("cloud_storage.standard_gb_month", "cloud_storage.class_a_per_10000")
    used |= set(storage_keys)
    storage_cost = stored / GIB * prices.price(storage_keys[0]) + len(objects) / 10_000 * (
        prices.price(storage_keys[1])
    )
    return RunCost(
        run_id=run_id,
        steps=steps,
        storage_bytes=stored,
        storage_objects=len(objects),
        storage_cost=storage_cost,
        currency=prices.currency,
        as_of=prices.as_of,
        region=prices.region,
        assumed=sorted(key for key in used if prices.is_assumed(key)),
        missing=missing,
    )


def object_sizes(storage: Storage, run_id: str) -> dict[str, int]:
    """The run's objects under runs/<id>/, name (inside the run) → bytes."""
    prefix = RunPaths(run_id).prefix
    return {
        blob.name[len(prefix) :]: int(blob.size or 0)
        for blob in storage.client.list_blobs(storage.bucket_name, prefix=prefix)
    }


def run_cost_inputs(
    storage: Storage, run_id: str
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, int]]:
    """What `estimate` reads of a run in the bucket: its records, config and object sizes."""
    paths = RunPaths(run_id)
    records = {
        name: storage.read_json(paths.prefix + name) or {}
        for name in ("started.json", "training.json", "evaluation.json", "deployment.json")
    }
    return records, storage.read_json(paths.config) or {}, object_sizes(storage, run_id)


def cost_lines(cost: RunCost) -> list[str]:
    """The estimate as text: a heading, a line per step, storage, the total, then what is
    assumed and missing (`mlpipe status RUN_ID` prints these)."""
    money = cost.currency
    lines = [f"cost (estimate, prices of {cost.as_of}, {cost.region}):"]
    for step in cost.steps:
        if step.machine_hours is None:
            used = f"{step.vcpu_seconds:.1f} vCPU-s, {step.gib_seconds:.1f} GiB-s"
        else:
            used = f"{step.machine_hours:.4f} machine-hours"
            if step.accelerator_hours:
                used += f", {step.accelerator_hours:.4f} accelerator-hours"
        lines.append(
            f"  {step.step:<13} {step.seconds:9.1f} s  {used:<32} {step.cost:10.6f} {money}"
            f"  ({step.basis})"
        )
    lines.append(
        f"  {'storage':<13} {cost.storage_objects} objects, {cost.storage_bytes} bytes, "
        f"a month: {cost.storage_cost:.6f} {money}"
    )
    lines.append(f"  {'total':<13} {cost.total:.6f} {money}")
    lines += [f"  assumed price: {key}" for key in cost.assumed]
    lines += [f"  missing: {what}" for what in cost.missing]
    return lines


# --- the stored estimate (runs/<id>/cost.json) ----------------------------------------------
def cost_to_dict(cost: RunCost) -> dict[str, Any]:
    """The estimate as the JSON of its record (every field, and the total)."""
    return {
        "run_id": cost.run_id,
        "steps": [{k: v for k, v in vars(step).items() if v is not None} for step in cost.steps],
        "storage_bytes": cost.storage_bytes,
        "storage_objects": cost.storage_objects,
        "storage_cost": cost.storage_cost,
        "total": cost.total,
        "currency": cost.currency,
        "as_of": cost.as_of,
        "region": cost.region,
        "assumed": list(cost.assumed),
        "missing": list(cost.missing),
    }


def cost_from_dict(raw: Mapping[str, Any]) -> RunCost:
    """A recorded estimate back as a RunCost (`cost_to_dict`'s inverse; the total is derived)."""
    return RunCost(
        run_id=str(raw["run_id"]),
        steps=[
            StepCost(
                step=str(s["step"]),
                seconds=float(s["seconds"]),
                cost=float(s["cost"]),
                basis=str(s.get("basis", "")),
                vcpu_seconds=s.get("vcpu_seconds"),
                gib_seconds=s.get("gib_seconds"),
                machine_hours=s.get("machine_hours"),
                accelerator_hours=s.get("accelerator_hours"),
            )
            for s in raw.get("steps") or []
        ],
        storage_bytes=int(raw.get("storage_bytes", 0)),
        storage_objects=int(raw.get("storage_objects", 0)),
        storage_cost=float(raw.get("storage_cost", 0.0)),
        currency=str(raw["currency"]),
        as_of=str(raw["as_of"]),
        region=str(raw["region"]),
        assumed=[str(a) for a in raw.get("assumed") or []],
        missing=[str(m) for m in raw.get("missing") or []],
    )


@dataclass(frozen=True)
class CostRecord:
    """runs/<id>/cost.json: the estimate the service that ended the run made, or why it has
    none (`problem`)."""

    run_id: str
    estimated_by: str  # the service that ended the run (deployer, trainer, ...)
    estimated_at: str  # ISO 8601, UTC
    cost: RunCost | None
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "estimated_by": self.estimated_by,
            "estimated_at": self.estimated_at,
        }
        if self.cost is not None:
            out["estimate"] = cost_to_dict(self.cost)
        else:
            out["no_estimate"] = self.problem
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CostRecord:
        found = raw.get("estimate")
        return cls(
            run_id=str(raw.get("run_id", "")),
            estimated_by=str(raw.get("estimated_by", "")),
            estimated_at=str(raw.get("estimated_at", "")),
            cost=cost_from_dict(found) if isinstance(found, Mapping) else None,
            problem=str(raw.get("no_estimate", "")),
        )

    def heading(self) -> str:
        """Which estimate this is, for readers: recorded when and by whom."""
        if not self.estimated_by:
            return "recorded (unreadable)"
        return f"recorded by the {self.estimated_by} at {self.estimated_at}"


def parse_tables(sizes_json: str, prices_json: str) -> tuple[dict[str, ServiceSize], PriceTable]:
    """Sizes and prices as a service is given them (MLPIPE_COST_SIZES, MLPIPE_PRICES).
    CostInputError names what is missing or unreadable."""
    if not sizes_json or not prices_json:
        missing = "MLPIPE_COST_SIZES" if not sizes_json else "MLPIPE_PRICES"
        raise CostInputError(f"no sizes or prices given ({missing} is not set)")
    try:
        return sizes_from_json(sizes_json), PriceTable.from_mapping(json.loads(prices_json))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CostInputError(f"sizes or prices unreadable: {exc!r}") from None


def estimate_in_bucket(
    storage: Storage,
    run_id: str,
    sizes_json: str,
    prices_json: str,
    steps_of: tuple[str, ...] = STEPS,
) -> RunCost:
    """The estimate of a run as its records in the bucket stand now. CostInputError names a
    missing size, price or table."""
    sizes, prices = parse_tables(sizes_json, prices_json)
    records, config, objects = run_cost_inputs(storage, run_id)
    return estimate(run_id, records, config, sizes, objects, prices, steps_of)


def record_estimate(
    storage: Storage,
    run_id: str,
    *,
    sizes_json: str,
    prices_json: str,
    by: str,
    now: dt.datetime | None = None,
) -> CostRecord | None:
    """Write the ended run's estimate as runs/<id>/cost.json unless one is recorded (first
    writer wins: a redelivery keeps the first); the record written, or None when one existed
    or the bucket could not be written.

    Never raises: a run's end must not fail on its estimate. A missing size or price makes a
    record that says why there is no estimate; a bucket error is logged and the readers
    compute on read."""
    at = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
    try:
        cost: RunCost | None = estimate_in_bucket(storage, run_id, sizes_json, prices_json)
        problem = ""
    except CostInputError as exc:
        cost, problem = None, str(exc)
    except Exception as exc:  # the run has ended either way; say why it has no estimate
        log.warning("run %s: no cost estimate: %r", run_id, exc)
        cost, problem = None, f"the estimate failed: {exc!r}"
    record = CostRecord(run_id, by, at, cost, problem)
    data = json.dumps(record.to_dict(), indent=2, sort_keys=True).encode()
    try:
        created = storage.create_if_absent(RunPaths(run_id).cost, data)
    except Exception as exc:
        log.warning("run %s: cost estimate not recorded: %r", run_id, exc)
        return None
    return record if created is not None else None


def read_record(storage: Storage, run_id: str) -> CostRecord | None:
    """The run's recorded estimate (runs/<id>/cost.json), or None for a run without one (it
    ended before estimates were recorded, or has not ended)."""
    path = RunPaths(run_id).cost
    try:
        raw = storage.read_json(path)
    except ValueError as exc:  # not JSON: said, not raised (the page shows the rest)
        return CostRecord(run_id, "", "", None, f"{path} is not valid JSON: {exc}")
    if raw is None:
        return None
    try:
        return CostRecord.from_dict(raw)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return CostRecord(run_id, "", "", None, f"{path} is not a cost record: {exc!r}")


# --- batch jobs ------------------------------------------------------------------------------
# Dataflow's default worker machine for batch jobs when the launch names none
# (cloud.google.com/dataflow/docs/guides/configure-worker-vm).
DATAFLOW_DEFAULT_MACHINE_TYPE = "n1-standard-1"


@dataclass(frozen=True)
class BatchCost:
    """What one batch prediction cost: Dataflow workers x machine x duration at
    dataflow_batch prices, or the predictor's Cloud Run time for a batch scored in it."""

    batch_id: str
    model: str
    runner: str  # "dataflow", or "predictor" (in the predictor's instance)
    seconds: float
    cost: float
    basis: str
    currency: str
    as_of: str
    region: str
    workers: int = 0
    machine_type: str = ""
    worker_hours: float | None = None
    vcpu_hours: float | None = None
    gb_hours: float | None = None
    vcpu_seconds: float | None = None
    gib_seconds: float | None = None
    assumed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


def batch_estimate(
    metrics: Mapping[str, Any],
    job: Mapping[str, Any] | None,
    sizes: Mapping[str, ServiceSize],
    prices: PriceTable,
) -> BatchCost:
    """The estimate of a finished batch from its metrics (duration_seconds) and its job record
    (predictions/<model>/jobs/<batch_id>.json; None for a batch scored in the predictor).

    A Dataflow job is priced as its workers x each worker's vCPUs and memory
    (dataflow_batch.machine_types) x the job's duration, per vCPU-hour and GB-hour; its worker
    count is the launch's max_workers (an upper bound: autoscaling may use fewer), one when the
    launch set none. A job on the local launcher and an in-process batch run in the
    predictor's instance: priced as its Cloud Run time. CostInputError names a missing entry."""
    seconds = max(float(metrics.get("duration_seconds") or 0.0), 0.0)
    batch_id, model = str(metrics.get("batch_id", "")), str(metrics.get("model", ""))
    launcher = str((job or {}).get("launcher", ""))
    if launcher != "dataflow":
        if "predictor" not in sizes:
            raise CostInputError("no size for service predictor (MLPIPE_COST_SIZES)")
        used: set[str] = set()
        step = _cloud_run("batch", seconds, sizes["predictor"], prices, used)
        return BatchCost(
            batch_id,
            model,
            "predictor",
            seconds,
            step.cost,
            step.basis + ", in the predictor",
            vcpu_seconds=step.vcpu_seconds,
            gib_seconds=step.gib_seconds,
            assumed=sorted(k for k in used if prices.is_assumed(k)),
            currency=prices.currency,
            as_of=prices.as_of,
            region=prices.region,
        )
    handle = (job or {}).get("handle") or {}
    notes = []
    machine = str(handle.get("machine_type") or "")
    if not machine:
        machine = DATAFLOW_DEFAULT_MACHINE_TYPE
        notes.append(f"no machine type recorded: priced as Dataflow's default, {machine}")
    workers = int(handle.get("max_workers") or 0)
    if workers <= 0:
        workers = 1
        notes.append("no max_workers recorded: priced as one worker (autoscaling may use more)")
    else:
        notes.append(f"priced as max_workers ({workers}): autoscaling may use fewer")
    node: Any = prices.entries.get("dataflow_batch", {}).get("machine_types", {}).get(machine)
    if not isinstance(node, Mapping) or "vcpu" not in node or "memory_gb" not in node:
        raise CostInputError(
            f"price table ({prices.region}, {prices.as_of}) has no "
            f"dataflow_batch.machine_types.{machine} (vcpu, memory_gb)"
        )
    keys = ("dataflow_batch.vcpu_hour", "dataflow_batch.gb_hour")
    worker_hours = workers * seconds / 3600
    vcpu_hours = worker_hours * float(node["vcpu"])
    gb_hours = worker_hours * float(node["memory_gb"])
    return BatchCost(
        batch_id,
        model,
        "dataflow",
        seconds,
        vcpu_hours * prices.price(keys[0]) + gb_hours * prices.price(keys[1]),
        f"Dataflow batch {workers} x {machine}",
        workers=workers,
        machine_type=machine,
        worker_hours=worker_hours,
        vcpu_hours=vcpu_hours,
        gb_hours=gb_hours,
        assumed=sorted(k for k in keys if prices.is_assumed(k)),
        notes=notes,
        currency=prices.currency,
        as_of=prices.as_of,
        region=prices.region,
    )


def batch_cost_lines(record: Mapping[str, Any]) -> list[str]:
    """A batch's recorded estimate (record_batch_estimate's JSON) as text."""
    if "estimate" not in record:
        return [f"cost: no estimate: {record.get('no_estimate', '')}"]
    c = record["estimate"]
    if c.get("worker_hours") is not None:
        used = (
            f"{c['worker_hours']:.4f} worker-hours, {c['vcpu_hours']:.4f} vCPU-h, "
            f"{c['gb_hours']:.4f} GB-h"
        )
    else:
        used = f"{c['vcpu_seconds']:.1f} vCPU-s, {c['gib_seconds']:.1f} GiB-s"
    lines = [
        f"cost (estimate, prices of {c['as_of']}, {c['region']}):",
        f"  batch {c['seconds']:9.1f} s  {used}  {c['cost']:.6f} {c['currency']}  ({c['basis']})",
    ]
    lines += [f"  note: {note}" for note in c.get("notes", [])]
    lines += [f"  assumed price: {key}" for key in c.get("assumed", [])]
    return lines


def record_batch_estimate(
    storage: Storage,
    model: str,
    batch_id: str,
    *,
    sizes_json: str,
    prices_json: str,
    now: dt.datetime | None = None,
) -> dict[str, Any] | None:
    """Write a finished batch's estimate (layout.batch_cost_path) unless one is recorded; the
    record written, else None. Never raises: the batch is done either way; a missing size or
    price makes a record that says why there is no estimate."""
    path = layout.batch_cost_path(model, batch_id)
    record: dict[str, Any] = {
        "batch_id": batch_id,
        "model": model,
        "estimated_at": (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
    }
    try:
        if storage.exists(path):
            return None
        metrics = storage.read_json(layout.batch_metrics_path(model, batch_id))
        if metrics is None:
            raise CostInputError(f"{layout.batch_metrics_path(model, batch_id)} does not exist")
        job = storage.read_json(layout.batch_job_path(model, batch_id))
        sizes, prices = parse_tables(sizes_json, prices_json)
        record["estimate"] = batch_estimate(metrics, job, sizes, prices).to_dict()
    except CostInputError as exc:
        record["no_estimate"] = str(exc)
    except Exception as exc:
        log.warning("batch %s: no cost estimate: %r", batch_id, exc)
        record["no_estimate"] = f"the estimate failed: {exc!r}"
    data = json.dumps(record, indent=2, sort_keys=True).encode()
    try:
        created = storage.create_if_absent(path, data)
    except Exception as exc:
        log.warning("batch %s: cost estimate not recorded: %r", batch_id, exc)
        return None
    return record if created is not None else None
