"""The stored estimate of a run (runs/<id>/cost.json), the report's steps so far, and a batch
job's estimate (mlpipe.store.run_cost), with figures worked out by hand."""

from __future__ import annotations

from typing import Any

import pytest

from mlpipe.store.run_cost import (
    STEPS,
    BatchCost,
    CostInputError,
    CostRecord,
    PriceTable,
    ServiceSize,
    batch_cost_lines,
    batch_estimate,
    cost_from_dict,
    cost_lines,
    cost_to_dict,
    estimate,
    parse_tables,
    sizes_to_json,
)
from mlpipe_ops.service_runtime import cost_sizes, load_prices, load_runtimes
from tests.unit.test_run_cost import OBJECTS, PRICES, REPO, SIZES, entry, records

VERTEX_T4 = {
    "training": {
        "vertex": {
            "machine_type": "n1-standard-8",
            "accelerator_type": "NVIDIA_TESLA_T4",
            "accelerator_count": 2,
        }
    }
}
BATCH_PRICES = PriceTable.from_mapping(
    {
        **PRICES.entries,
        "dataflow_batch": {
            "vcpu_hour": entry(0.056),
            "gb_hour": entry(0.003557, assumed=True),
            "machine_types": {
                "n1-standard-1": {"vcpu": 1, "memory_gb": 3.75},
                "n1-standard-2": {"vcpu": 2, "memory_gb": 7.5},
            },
        },
    }
)
PREDICTOR = {"predictor": ServiceSize(cpu=1, memory_gib=2, cpu_always_allocated=False)}


def vertex_run() -> dict[str, dict[str, Any]]:
    run = records("TRAINING_BACKEND_VERTEX")
    run["training.json"]["context"]["event_time"] = "2026-12-01T10:30:03Z"  # 30 minutes
    return run


def test_a_recorded_estimate_reads_back_as_it_was_computed() -> None:
    cost = estimate("r1", vertex_run(), VERTEX_T4, SIZES, OBJECTS, PRICES)

    stored = cost_to_dict(cost)

    assert cost_from_dict(stored) == cost
    assert stored["total"] == pytest.approx(cost.total)
    assert [s["step"] for s in stored["steps"]] == list(STEPS)


def test_a_vertex_jobs_accelerator_hours_are_its_accelerators_times_its_hours() -> None:
    cost = estimate("r1", vertex_run(), VERTEX_T4, SIZES, OBJECTS, PRICES)

    job = {s.step: s for s in cost.steps}["training job"]

    assert (job.machine_hours, job.accelerator_hours) == (pytest.approx(0.5), pytest.approx(1.0))
    # 0.5 h x (0.40 + 2 x 0.35)
    assert job.cost == pytest.approx(0.55)
    assert "0.5000 machine-hours, 1.0000 accelerator-hours" in "\n".join(cost_lines(cost))


def test_a_record_says_who_estimated_it_and_when_or_why_there_is_none() -> None:
    cost = estimate("r1", records(), {}, SIZES, OBJECTS, PRICES)
    made = CostRecord("r1", "deployer", "2026-12-01T10:02:00+00:00", cost)
    none = CostRecord("r2", "deployer", "2026-12-01T10:02:00+00:00", None, "no price of x")

    assert CostRecord.from_dict(made.to_dict()) == made
    assert CostRecord.from_dict(none.to_dict()) == none
    assert none.to_dict()["no_estimate"] == "no price of x" and "estimate" not in none.to_dict()
    assert made.heading() == "recorded by the deployer at 2026-12-01T10:02:00+00:00"


def test_the_steps_so_far_leave_the_deployer_out_without_calling_it_missing() -> None:
    so_far = tuple(s for s in STEPS if s != "deployer")

    cost = estimate("r1", records(), {}, SIZES, OBJECTS, PRICES, so_far)

    assert [s.step for s in cost.steps] == ["ingest", "trainer", "training job", "evaluator"]
    assert cost.missing == []
    # The full estimate's total less the deployer's 5 s at 1 vCPU 1 GiB instance-based.
    full = estimate("r1", records(), {}, SIZES, OBJECTS, PRICES)
    assert cost.total == pytest.approx(full.total - 0.0001)


def test_tables_not_given_to_a_service_are_an_error_naming_the_variable() -> None:
    with pytest.raises(CostInputError, match="MLPIPE_COST_SIZES is not set"):
        parse_tables("", PRICES.to_json())
    with pytest.raises(CostInputError, match="MLPIPE_PRICES is not set"):
        parse_tables(sizes_to_json(SIZES), "")
    with pytest.raises(CostInputError, match="unreadable"):
        parse_tables("{not json", PRICES.to_json())


def dataflow_job(machine: str = "n1-standard-2", workers: int = 4) -> dict[str, Any]:
    return {
        "launcher": "dataflow",
        "handle": {"job_id": "j1", "machine_type": machine, "max_workers": workers},
    }


METRICS = {"batch_id": "b1", "model": "iris", "duration_seconds": 1800.0}


def test_a_dataflow_batch_is_its_workers_times_the_machine_times_its_duration() -> None:
    cost = batch_estimate(METRICS, dataflow_job(), PREDICTOR, BATCH_PRICES)

    # 4 workers x 0.5 h = 2 worker-hours; x 2 vCPU = 4 vCPU-h; x 7.5 GB = 15 GB-h.
    assert (cost.worker_hours, cost.vcpu_hours, cost.gb_hours) == (
        pytest.approx(2.0),
        pytest.approx(4.0),
        pytest.approx(15.0),
    )
    assert cost.cost == pytest.approx(4 * 0.056 + 15 * 0.003557)
    assert (cost.runner, cost.basis) == ("dataflow", "Dataflow batch 4 x n1-standard-2")
    assert cost.assumed == ["dataflow_batch.gb_hour"]
    assert cost.notes == ["priced as max_workers (4): autoscaling may use fewer"]


def test_a_dataflow_batch_launched_without_machine_or_workers_is_priced_as_the_defaults() -> None:
    cost = batch_estimate(METRICS, dataflow_job("", 0), PREDICTOR, BATCH_PRICES)

    assert (cost.workers, cost.machine_type) == (1, "n1-standard-1")
    assert cost.cost == pytest.approx(0.5 * (0.056 + 3.75 * 0.003557))
    assert any("Dataflow's default, n1-standard-1" in n for n in cost.notes)
    assert any("priced as one worker" in n for n in cost.notes)


def test_a_batch_scored_in_the_predictor_is_priced_as_its_cloud_run_time() -> None:
    cost = batch_estimate({**METRICS, "duration_seconds": 10.0}, None, PREDICTOR, BATCH_PRICES)

    # 10 s x 1 vCPU x 0.000024 + 10 s x 2 GiB x 0.0000025, request-based.
    assert cost.cost == pytest.approx(0.00024 + 0.00005)
    assert (cost.runner, cost.vcpu_seconds, cost.gib_seconds) == ("predictor", 10.0, 20.0)
    assert cost.worker_hours is None


def test_a_machine_type_the_table_lacks_is_an_error_naming_its_entry() -> None:
    with pytest.raises(CostInputError, match=r"dataflow_batch\.machine_types\.n2-highcpu-8"):
        batch_estimate(METRICS, dataflow_job("n2-highcpu-8"), PREDICTOR, BATCH_PRICES)


def test_a_batch_estimate_prints_its_hours_notes_and_assumed_prices() -> None:
    cost: BatchCost = batch_estimate(METRICS, dataflow_job(), PREDICTOR, BATCH_PRICES)

    lines = batch_cost_lines({"estimate": cost.to_dict()})

    assert lines[0] == "cost (estimate, prices of 2026-12-01, us-central1):"
    assert "2.0000 worker-hours, 4.0000 vCPU-h, 15.0000 GB-h" in lines[1]
    assert f"{cost.cost:.6f} USD" in lines[1]
    assert lines[2:] == [
        "  note: priced as max_workers (4): autoscaling may use fewer",
        "  assumed price: dataflow_batch.gb_hour",
    ]
    assert batch_cost_lines({"no_estimate": "no size"}) == ["cost: no estimate: no size"]


def test_the_shipped_table_prices_a_default_dataflow_batch_and_a_predictor_batch() -> None:
    prices = load_prices(REPO / "infra" / "prices.yaml")
    sizes = cost_sizes(load_runtimes("prod", REPO / "infra" / "runtime.yaml"))

    on_dataflow = batch_estimate(METRICS, dataflow_job("", 0), sizes, prices)
    in_process = batch_estimate(METRICS, None, sizes, prices)

    assert on_dataflow.cost > 0 and in_process.cost > 0
    assert on_dataflow.machine_type == "n1-standard-1"
