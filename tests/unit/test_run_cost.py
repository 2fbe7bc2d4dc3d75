"""A run's cost estimate (mlpipe.store.run_cost), with figures worked out by hand from the
prices and sizes below, not from the code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlpipe.store.run_cost import (
    CostInputError,
    PriceTable,
    ServiceSize,
    cost_lines,
    estimate,
    sizes_from_json,
    sizes_to_json,
)
from mlpipe_ops.service_runtime import cost_sizes, load_prices, load_runtimes

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3


def entry(price: float, assumed: bool = False) -> dict[str, Any]:
    return {"price": price, "source": "https://example.test/pricing", "assumed": assumed}


PRICES = PriceTable.from_mapping(
    {
        "as_of": "2026-12-01",
        "currency": "USD",
        "region": "us-central1",
        "cloud_run": {
            "instance_based": {"vcpu_second": entry(0.000018), "gib_second": entry(0.000002)},
            "request_based": {
                "vcpu_second": entry(0.000024),
                "gib_second": entry(0.0000025, assumed=True),
            },
        },
        "vertex_training": {
            "machine_types": {"n1-standard-8": entry(0.40)},
            "accelerators": {"NVIDIA_TESLA_T4": entry(0.35, assumed=True)},
        },
        "cloud_storage": {
            "standard_gb_month": entry(0.020),
            "class_a_per_10000": entry(0.05),
        },
    }
)
SIZES = {
    "ingest": ServiceSize(cpu=1, memory_gib=1, cpu_always_allocated=False),
    "trainer": ServiceSize(cpu=2, memory_gib=2, cpu_always_allocated=True),
    "evaluator": ServiceSize(cpu=1, memory_gib=1, cpu_always_allocated=False),
    "deployer": ServiceSize(cpu=1, memory_gib=1, cpu_always_allocated=True),
}
# Half a GiB in two objects.
OBJECTS = {"model.joblib": GIB // 2 - 1000, "training.json": 1000}


def records(backend: str = "TRAINING_BACKEND_LOCAL") -> dict[str, dict[str, Any]]:
    """A run requested at 10:00:00 whose steps took 2 s, 1 s, 100 s, 10 s and 5 s."""
    dataset = {"landed_at": "2026-12-01T10:00:02Z"}
    return {
        "started.json": {
            "context": {
                "requested_at": "2026-12-01T10:00:00Z",
                "event_time": "2026-12-01T10:00:03Z",
            },
            "dataset": dataset,
            "training_backend": backend,
        },
        "training.json": {
            "context": {"event_time": "2026-12-01T10:01:43Z"},
            "dataset": dataset,
            "finished_at": "2026-12-01T10:01:42Z",
        },
        "evaluation.json": {"context": {"event_time": "2026-12-01T10:01:53.000Z"}},
        "deployment.json": {"context": {"event_time": "2026-12-01T10:01:58+00:00"}},
    }


def by_step(cost: Any) -> dict[str, Any]:
    return {s.step: s for s in cost.steps}


def test_a_local_run_is_each_steps_duration_times_its_size_the_job_in_the_trainer() -> None:
    cost = estimate("r1", records(), {}, SIZES, OBJECTS, PRICES)

    steps = by_step(cost)
    # ingest: 2 s x 1 vCPU x 0.000024 + 2 s x 1 GiB x 0.0000025 (request-based)
    assert steps["ingest"].vcpu_seconds == 2 and steps["ingest"].gib_seconds == 2
    assert steps["ingest"].cost == pytest.approx(0.000053)
    # trainer: 1 s x 2 vCPU x 0.000018 + 1 s x 2 GiB x 0.000002 (instance-based)
    assert steps["trainer"].cost == pytest.approx(0.000040)
    # training job: 100 s inside the trainer's instance: 200 vCPU-s, 200 GiB-s
    job = steps["training job"]
    assert (job.seconds, job.vcpu_seconds, job.gib_seconds) == (100, 200, 200)
    assert job.machine_hours is None
    assert job.cost == pytest.approx(0.004)
    assert job.basis == "Cloud Run 2 vCPU 2 GiB instance-based"
    # evaluator: 10 s request-based; deployer: 5 s instance-based
    assert steps["evaluator"].cost == pytest.approx(0.000265)
    assert steps["deployer"].cost == pytest.approx(0.0001)
    # storage: 0.5 GiB a month x 0.020 + 2 Class A operations x 0.05 / 10,000
    assert (cost.storage_objects, cost.storage_bytes) == (2, GIB // 2)
    assert cost.storage_cost == pytest.approx(0.01001)
    assert cost.total == pytest.approx(0.014468)
    assert (cost.as_of, cost.region, cost.currency) == ("2026-12-01", "us-central1", "USD")
    assert cost.assumed == ["cloud_run.request_based.gib_second"]
    assert cost.missing == []


def test_a_vertex_job_is_priced_by_machine_hour_with_its_accelerators() -> None:
    config = {
        "training": {
            "backend": "vertex",
            "vertex": {
                "machine_type": "n1-standard-8",
                "accelerator_type": "NVIDIA_TESLA_T4",
                "accelerator_count": 1,
            },
        }
    }
    run = records("TRAINING_BACKEND_VERTEX")
    run["training.json"]["context"]["event_time"] = "2026-12-01T10:30:03Z"  # 30 minutes

    cost = estimate("r2", run, config, SIZES, {}, PRICES)

    job = by_step(cost)["training job"]
    # 0.5 h x (0.40 for the machine + 1 x 0.35 for the T4)
    assert job.machine_hours == pytest.approx(0.5)
    assert job.cost == pytest.approx(0.375)
    assert job.vcpu_seconds is None and job.basis == "Vertex AI n1-standard-8 + 1 x NVIDIA_TESLA_T4"
    # The trainer is priced for its own step only: 1 s, as for a local run.
    assert by_step(cost)["trainer"].cost == pytest.approx(0.000040)
    assert "vertex_training.accelerators.NVIDIA_TESLA_T4" in cost.assumed


def test_a_run_missing_records_is_estimated_for_what_is_recorded_and_says_what_is_not() -> None:
    only_started = {"started.json": records()["started.json"]}

    cost = estimate("r3", only_started, {}, SIZES, {"started.json": 10}, PRICES)

    assert [s.step for s in cost.steps] == ["ingest", "trainer"]
    assert cost.missing == [
        "training job: not recorded (needs training.json)",
        "evaluator: not recorded (needs evaluation.json)",
        "deployer: not recorded (needs deployment.json)",
    ]
    assert cost.total == pytest.approx(0.000053 + 0.000040 + 10 / GIB * 0.020 + 0.05 / 10_000)


def test_a_price_the_table_lacks_is_a_clear_error_naming_it() -> None:
    config = {"training": {"vertex": {"machine_type": "n1-highmem-2"}}}

    with pytest.raises(
        CostInputError, match=r"has no vertex_training\.machine_types\.n1-highmem-2"
    ):
        estimate("r4", records("TRAINING_BACKEND_VERTEX"), config, SIZES, {}, PRICES)


def test_a_table_without_its_date_is_refused() -> None:
    with pytest.raises(CostInputError, match="as_of: required key missing"):
        PriceTable.from_mapping({"currency": "USD", "region": "us-central1"})


def test_the_printed_estimate_names_its_prices_date_and_region_and_every_step() -> None:
    lines = cost_lines(estimate("r1", records(), {}, SIZES, OBJECTS, PRICES))

    assert lines[0] == "cost (estimate, prices of 2026-12-01, us-central1):"
    assert [line.split()[0] for line in lines[1:6]] == [
        "ingest",
        "trainer",
        "training",
        "evaluator",
        "deployer",
    ]
    assert "0.004000 USD" in lines[3] and "200.0 vCPU-s, 200.0 GiB-s" in lines[3]
    assert lines[7] == "  total         0.014468 USD"
    assert lines[8] == "  assumed price: cloud_run.request_based.gib_second"


def test_the_shipped_table_prices_every_service_and_the_examples_machines() -> None:
    prices = load_prices(REPO / "infra" / "prices.yaml")
    sizes = cost_sizes(load_runtimes("prod", REPO / "infra" / "runtime.yaml"))
    crops = {
        "training": {
            "vertex": {
                "machine_type": "n1-standard-8",
                "accelerator_type": "NVIDIA_TESLA_T4",
                "accelerator_count": 1,
            }
        }
    }

    local = estimate("r5", records(), {}, sizes, OBJECTS, prices)
    vertex = estimate("r6", records("TRAINING_BACKEND_VERTEX"), crops, sizes, OBJECTS, prices)
    default = estimate("r7", records("TRAINING_BACKEND_VERTEX"), {}, sizes, OBJECTS, prices)

    assert (prices.currency, prices.region) == ("USD", "us-central1")
    assert all(c.total > 0 and not c.missing for c in (local, vertex, default))
    assert by_step(default)["training job"].basis == "Vertex AI n1-standard-4"
    assert prices.price("dataflow_batch.vcpu_hour") > 0
    assert prices.price("dataflow_batch.gb_hour") > 0


def test_sizes_travel_as_json_unchanged() -> None:
    assert sizes_from_json(sizes_to_json(SIZES)) == SIZES
    assert json.loads(sizes_to_json(SIZES))["trainer"] == {
        "cpu": 2,
        "memory_gib": 2,
        "cpu_always_allocated": True,
    }
