"""Training and evaluation a team can trust: the champion gate, reproducibility, reports,
and every kind of bad training input failing cleanly."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.store import layout
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_evaluator.evaluation import Evaluator, evaluate
from mlpipe_trainer.training import train
from tests.conftest import REPO, unique, wait_until
from tests.integration.conftest import Cloud, forward, notification

pytestmark = pytest.mark.integration


def run_chain(
    services: dict[str, TestClient], cloud: Cloud, csv_text: str, n: int, name: str = "iris"
) -> tuple[events_pb2.EvaluationCompleted, events_pb2.DeploymentCompleted]:
    path = f"datasets/{name}/dt=2026-11-2{n}/upload-{n}.csv"
    generation = cloud.storage.write(path, csv_text.encode())
    services["trainer"].post("/pubsub/push", content=notification(cloud, path, generation, f"n{n}"))
    trained = cloud.pulled(events.TRAINING_COMPLETED, timeout=60)
    assert len(trained) == 1, cloud.pulled(events.PIPELINE_FAILURES, timeout=1)
    forward(services["evaluator"], trained[0], n)
    evaluated = cloud.pulled(events.EVALUATION_COMPLETED)[0]
    forward(services["deployer"], evaluated, n)
    return evaluated, cloud.pulled(events.DEPLOYMENT_COMPLETED)[0]


def test_a_worse_challenger_is_blocked_by_the_champion_gate(
    services: dict[str, TestClient], cloud: Cloud, iris_csv: str
) -> None:
    base = (REPO / "examples/iris/pipeline.yaml").read_text()
    relative = base.replace(
        "gates:\n", "gates:\n  relative:\n    - metric: accuracy\n      max_degradation: 0.02\n"
    )
    cloud.apply_config(parse_config(relative))
    first_eval, first = run_chain(services, cloud, iris_csv, 1)
    # Same data, a crippled model, no absolute gate: only the champion gate can stop it.
    crippled = (
        relative.replace("sklearn.ensemble.RandomForestClassifier", "sklearn.dummy.DummyClassifier")
        .replace(
            "    n_estimators: 100\n    random_state: 0\n    n_jobs: 1\n",
            "    strategy: most_frequent\n",
        )
        .replace("  min_accuracy: 0.75\n  min_per_class_f1: 0.70\n", "")
    )
    cloud.apply_config(parse_config(crippled))

    second_eval, second = run_chain(services, cloud, iris_csv, 2)

    assert first.deployed and first.version == 1
    gate = next(g for g in first_eval.gates if g.kind == "relative")
    assert gate.passed and gate.note.startswith("not applied")
    assert not second_eval.passed
    blocked = next(g for g in second_eval.gates if g.kind == "relative")
    assert not blocked.passed
    assert second_eval.champion_version == 1
    assert second_eval.champion_metrics["accuracy"] == pytest.approx(
        first_eval.metrics["accuracy"]
    )  # same holdout, same champion
    assert blocked.threshold == pytest.approx(first_eval.metrics["accuracy"] - 0.02)
    assert not second.deployed and "relative_accuracy" in second.reason
    assert Registry(cloud.storage).alias("iris-classifier") == 1
    # The report is drawn after the push is answered.
    report = wait_until(
        lambda: cloud.storage.read(cloud.storage.path_of(second_eval.report_uri)), 60, "report"
    )
    page = report.data.decode()
    assert "<svg" in page and "confusion matrix" in page and "champion v1" in page
    assert "relative_accuracy" in page and second_eval.context.run_id in page


def _train_in(
    storage: Storage, config: PipelineConfig, data: bytes, fmt: str = "csv"
) -> events_pb2.TrainingCompleted:
    sha = sha256_hex(data)
    run_id = layout.run_id_for(sha, config.sha256())
    path = f"datasets/{config.name}/dt=2026-11-23/{sha[:16]}.{fmt}"
    generation = storage.write(path, data)
    storage.write(layout.RunPaths(run_id).config, config.canonical_json())
    started = events_pb2.TrainingStarted(
        context=events.context(
            producer="test",
            code_version="test",
            run_id=run_id,
            pipeline=config.name,
            config_sha256=config.sha256(),
        ),
        dataset=events_pb2.DatasetRef(
            uri=storage.uri(path), generation=generation, sha256=sha, name=config.name, format=fmt
        ),
    )
    return train(storage, started, "test")


def test_same_bytes_and_config_give_the_same_run_split_and_metrics(cloud: Cloud) -> None:
    config = parse_config((REPO / "examples/crops/pipeline.yaml").read_text())
    data = (REPO / "examples/crops/crops.csv").read_bytes()
    other = Storage(
        make_client(cloud.project), make_client(cloud.project).create_bucket(unique("bucket")).name
    )
    results = []
    for storage in (cloud.storage, other):
        trained = _train_in(storage, config, data)
        evaluate_direct(storage, cloud, trained)
        paths = layout.RunPaths(trained.context.run_id)
        results.append(
            (
                trained.context.run_id,
                storage.read_json(paths.split),
                storage.read_json(paths.metrics)["metrics"],
            )
        )

    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    assert results[0][2] == results[1][2]
    assert results[0][2]["accuracy"] > 0.75


def evaluate_direct(storage: Storage, cloud: Cloud, trained: events_pb2.TrainingCompleted) -> None:
    result = evaluate(trained, Evaluator(storage, cloud.publisher, "test"))
    assert result.status in ("passed", "gates_failed")


def test_bikeshare_time_split_never_trains_on_the_future(cloud: Cloud) -> None:
    config = parse_config((REPO / "examples/bikeshare/pipeline.yaml").read_text())
    trained = _train_in(
        cloud.storage, config, (REPO / "examples/bikeshare/bikeshare.csv").read_bytes()
    )
    import pandas as pd

    frame = pd.read_csv(REPO / "examples/bikeshare/bikeshare.csv", parse_dates=["timestamp"])
    split = cloud.storage.read_json(layout.RunPaths(trained.context.run_id).split)

    train_times = frame.iloc[split["train"]]["timestamp"]
    holdout_times = frame.iloc[split["holdout"]]["timestamp"]
    assert split["strategy"] == "time"
    assert train_times.max() < holdout_times.min()
    assert holdout_times.min() == pd.Timestamp("2026-06-08T00:00:00Z")
    assert len(split["train"]) + len(split["holdout"]) == len(frame)


IRIS_HEADER = "sepal_length,sepal_width,petal_length,petal_width,species\n"


def iris_rows(n: int, species: tuple[str, ...] = ("setosa", "versicolor")) -> str:
    return "".join(
        f"{5 + i % 7 / 10},{3 + i % 5 / 10},{1 + i % 4},{i % 3 / 10},{species[i % len(species)]}\n"
        for i in range(n)
    )


@pytest.mark.parametrize(
    ("case", "config_edit", "data", "reason", "named"),
    [
        (
            "unknown estimator",
            ("RandomForestClassifier", "NoSuchForest"),
            IRIS_HEADER + iris_rows(60),
            "invalid_estimator",
            "NoSuchForest",
        ),
        (
            "rejected params",
            ("n_jobs: 1", "n_jobs: 1\n    bogus_param: 3"),
            IRIS_HEADER + iris_rows(60),
            "invalid_estimator",
            "bogus_param",
        ),
        (
            "target absent",
            None,
            IRIS_HEADER.replace(",species", ",kind") + iris_rows(60),
            "missing_column",
            "species",
        ),
        ("single class", None, IRIS_HEADER + iris_rows(60, ("setosa",)), "single_class", "setosa"),
        (
            "all-NaN feature",
            None,
            IRIS_HEADER + "".join(f"{5 + i / 10},3,,0.2,{('a', 'b')[i % 2]}\n" for i in range(60)),
            "all_nan_feature",
            "petal_length",
        ),
        (
            "non-numeric",
            None,
            IRIS_HEADER + iris_rows(40) + "5.1,wide,1.4,0.2,setosa\n" + iris_rows(5),
            "wrong_type",
            "data row 41",
        ),
        (
            "too few rows",
            ("min_rows: 30", "min_rows: 1"),
            IRIS_HEADER + iris_rows(2),
            "too_few_rows",
            "holdout",
        ),
    ],
)
def test_bad_training_input_fails_with_its_cause_and_writes_nothing(
    cloud: Cloud,
    iris_config: PipelineConfig,
    case: str,
    config_edit: tuple[str, str] | None,
    data: str,
    reason: str,
    named: str,
) -> None:
    text = (REPO / "examples/iris/pipeline.yaml").read_text()
    if config_edit:
        text = text.replace(*config_edit)
    config = parse_config(text)

    with pytest.raises(PermanentError) as failure:
        _train_in(cloud.storage, config, data.encode())

    assert failure.value.reason == reason, case
    assert named in failure.value.message, case
    written = [n.rsplit("/", 1)[-1] for n in cloud.storage.list("runs/")]
    assert written == ["config.json"], case  # no half-written run
