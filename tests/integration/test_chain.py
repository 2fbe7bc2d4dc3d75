"""trainer → training job → evaluator → deployer → predictor, each service's real app in
process, talking to the emulators; the job is a real subprocess."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.store import layout
from mlpipe.store.registry import Registry
from mlpipe.store.storage import sha256_hex
from mlpipe.v1 import events_pb2
from tests.integration.conftest import Cloud, forward, job_started, notification, upload

pytestmark = pytest.mark.integration


def test_a_dropped_file_trains_evaluates_deploys_and_serves(
    services: dict[str, TestClient], cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    cloud.apply_config(iris_config)
    path, generation = upload(cloud, iris_csv)

    started = services["trainer"].post(
        "/pubsub/push", content=notification(cloud, path, generation)
    )
    assert job_started(started), started.text
    trained = cloud.pulled(events.TRAINING_COMPLETED, timeout=60)
    assert len(trained) == 1
    forward(services["evaluator"], trained[0])
    evaluated = cloud.pulled(events.EVALUATION_COMPLETED)
    forward(services["deployer"], evaluated[0])
    deployed = cloud.pulled(events.DEPLOYMENT_COMPLETED)
    serving = forward(services["predictor"], deployed[0])
    reply = services["predictor"].post(
        "/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}
    )

    run_id = trained[0].context.run_id
    assert run_id == layout.run_id_for(sha256_hex(iris_csv.encode()), iris_config.sha256())
    assert evaluated[0].passed
    assert {g.name for g in evaluated[0].gates} >= {"min_accuracy", "min_per_class_f1[setosa]"}
    assert deployed[0].deployed and deployed[0].version == 1
    assert serving == {
        "status": "serving",
        "run_id": run_id,
        "model": "iris-classifier",
        "version": 1,
    }
    assert reply.status_code == 200
    assert reply.json()["predictions"] == ["setosa", "virginica"]
    assert reply.json()["modelVersionId"] == "1"
    lineage_record = cloud.storage.read_json(f"runs/{run_id}/lineage.json")
    assert lineage_record["dataset"]["sha256"] == sha256_hex(iris_csv.encode())
    assert lineage_record["config_sha256"] == iris_config.sha256()
    assert lineage_record["model"]["sha256"] == deployed[0].model_sha256


def test_redelivered_notifications_and_events_make_one_version(
    services: dict[str, TestClient], cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    cloud.apply_config(iris_config)
    path, generation = upload(cloud, iris_csv)
    services["trainer"].post("/pubsub/push", content=notification(cloud, path, generation))
    # While the job runs, the same notification arrives again: the live claim holds.
    again = services["trainer"].post(
        "/pubsub/push", content=notification(cloud, path, generation, "n2")
    )
    assert again.json()["status"] in ("in_progress", "duplicate")
    trained = cloud.pulled(events.TRAINING_COMPLETED, timeout=60)

    for n in range(3):
        forward(services["evaluator"], trained[0], n)
    evaluated = cloud.pulled(events.EVALUATION_COMPLETED, expect=3)
    for n, event in enumerate(evaluated):
        forward(services["deployer"], event, n)
    deployed = cloud.pulled(events.DEPLOYMENT_COMPLETED, expect=3)
    late = services["trainer"].post(
        "/pubsub/push", content=notification(cloud, path, generation, "n3")
    )

    assert len(trained) == 1
    assert len({e.SerializeToString(deterministic=True) for e in evaluated}) == 1
    assert {d.version for d in deployed} == {1}
    assert late.json()["status"] == "duplicate"
    assert Registry(cloud.storage).versions("iris-classifier") == [1]
    # The duplicate re-publishes the recorded TrainingCompleted so a stalled chain resumes.
    assert cloud.pulled(events.TRAINING_COMPLETED)[0] == trained[0]


def test_a_dataset_without_the_target_column_fails_cleanly(
    services: dict[str, TestClient], cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    cloud.apply_config(iris_config)
    no_target = "\n".join(",".join(line.split(",")[:4]) for line in iris_csv.splitlines())
    path, generation = upload(cloud, no_target + "\n")

    services["trainer"].post("/pubsub/push", content=notification(cloud, path, generation))
    failed = cloud.pulled(events.PIPELINE_FAILURES, timeout=60)

    assert [f.reason for f in failed] == ["missing_column"]
    assert "species" in failed[0].message and path in failed[0].message
    # Checked by the trainer before any job, and the upload copied to quarantine.
    assert events.pipeline_stage(failed[0]) == "trainer"
    assert failed[0].quarantine_uri.startswith(cloud.storage.uri("quarantine/missing_column/"))
    kept = cloud.storage.read(cloud.storage.path_of(failed[0].quarantine_uri))
    assert kept is not None and kept.data == (no_target + "\n").encode()
    run_id = failed[0].context.run_id
    assert cloud.storage.exists(f"runs/{run_id}/failed.json")
    assert not cloud.storage.exists(f"runs/{run_id}/model.joblib")
    again = services["trainer"].post(
        "/pubsub/push", content=notification(cloud, path, generation, "n2")
    )
    assert again.json()["status"] == "duplicate"


def test_failed_gates_deploy_nothing_and_say_why(
    services: dict[str, TestClient], cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    strict = parse_config(
        iris_config.to_yaml().replace("min_accuracy: 0.75", "min_accuracy: 0.999")
    )
    cloud.apply_config(strict)
    path, generation = upload(cloud, iris_csv)
    services["trainer"].post("/pubsub/push", content=notification(cloud, path, generation))
    trained = cloud.pulled(events.TRAINING_COMPLETED, timeout=60)

    forward(services["evaluator"], trained[0])
    evaluated = cloud.pulled(events.EVALUATION_COMPLETED)
    forward(services["deployer"], evaluated[0])
    deployed = cloud.pulled(events.DEPLOYMENT_COMPLETED)

    assert not evaluated[0].passed
    gate = next(g for g in evaluated[0].gates if g.name == "min_accuracy")
    assert gate.threshold == pytest.approx(0.999) and not gate.passed
    assert not deployed[0].deployed and "min_accuracy" in deployed[0].reason
    assert Registry(cloud.storage).versions("iris-classifier") == []
    assert services["predictor"].get("/readyz").status_code == 503


def test_a_deployment_of_a_model_the_registry_does_not_know_is_ignored(
    services: dict[str, TestClient], cloud: Cloud
) -> None:
    done = events_pb2.DeploymentCompleted(model_name="never-registered", deployed=True, version=3)

    reply = forward(services["predictor"], done)

    assert reply["status"] == "ignored" and reply["model"] == "never-registered"
    assert "no champion or canary" in reply["reason"]
    assert services["predictor"].get("/readyz").status_code == 503


def test_objects_outside_datasets_are_ignored(
    services: dict[str, TestClient], cloud: Cloud
) -> None:
    generation = cloud.storage.write("runs/x/model.joblib", b"x")

    reply = services["trainer"].post(
        "/pubsub/push", content=notification(cloud, "runs/x/model.joblib", generation)
    )

    assert reply.json()["status"] == "ignored"


def test_a_malformed_dataset_path_is_reported(
    services: dict[str, TestClient], cloud: Cloud
) -> None:
    generation = cloud.storage.write("datasets/iris/data.csv", b"a,b\n1,2\n")

    reply = services["trainer"].post(
        "/pubsub/push", content=notification(cloud, "datasets/iris/data.csv", generation)
    )

    assert reply.json()["reason"] == "bad_dataset_path"
    assert "dt=YYYY-MM-DD" in reply.json()["detail"]
    assert [f.reason for f in cloud.pulled(events.PIPELINE_FAILURES)] == ["bad_dataset_path"]


def test_predictor_rejects_bad_instances_with_400(
    services: dict[str, TestClient], cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    cloud.apply_config(iris_config)
    path, generation = upload(cloud, iris_csv)
    services["trainer"].post("/pubsub/push", content=notification(cloud, path, generation))
    trained = cloud.pulled(events.TRAINING_COMPLETED, timeout=60)
    forward(services["evaluator"], trained[0])
    forward(services["deployer"], cloud.pulled(events.EVALUATION_COMPLETED)[0])
    forward(services["predictor"], cloud.pulled(events.DEPLOYMENT_COMPLETED)[0])
    predictor = services["predictor"]

    cases = {
        "wrong count": ({"instances": [[1, 2, 3]]}, "has 3 values"),
        "wrong type": ({"instances": [[1, 2, "x", 4]]}, "petal_length"),
        "empty": ({"instances": []}, "non-empty"),
        "no instances": ({"rows": []}, "'instances'"),
        "missing feature": ({"instances": [{"sepal_length": 1}]}, "lacks feature"),
    }
    for name, (body, fragment) in cases.items():
        reply = predictor.post("/predict", json=body)
        assert reply.status_code == 400, name
        assert fragment in reply.json()["error"]["message"], name
    big = predictor.post("/predict", content=b'{"instances": [' + b"[1,2,3,4]," * 200_000 + b"]}")
    assert big.status_code == 413
    assert predictor.post("/predict", content=b"{not json").status_code == 400
    assert predictor.get("/readyz").status_code == 200


def test_identical_bytes_ingested_under_a_new_config_start_a_new_run(
    services: dict[str, TestClient], cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    cloud.apply_config(iris_config)
    path, generation = upload(cloud, iris_csv)
    services["trainer"].post("/pubsub/push", content=notification(cloud, path, generation))
    first = cloud.pulled(events.TRAINING_COMPLETED, timeout=60)[0]
    changed = parse_config(iris_config.to_yaml().replace("n_estimators: 100", "n_estimators: 20"))
    cloud.apply_config(changed)
    sha = sha256_hex(iris_csv.encode())
    landed = events_pb2.DatasetLanded(
        context=events_pb2.RunContext(request_id="again", pipeline="iris"),
        dataset=events_pb2.DatasetRef(
            uri=cloud.storage.uri(path),
            generation=generation,
            sha256=sha,
            name="iris",
            format="csv",
            row_count=150,
        ),
    )
    attributes = {events.EVENT_TYPE_ATTR: "mlpipe.v1.DatasetLanded"}

    fresh = services["trainer"].post(
        "/pubsub/push",
        content=make_envelope(events.encode(landed), attributes=attributes, message_id="l1"),
    )
    landed.already_present = True
    again = services["trainer"].post(
        "/pubsub/push",
        content=make_envelope(events.encode(landed), attributes=attributes, message_id="l2"),
    )
    second = cloud.pulled(events.TRAINING_COMPLETED, timeout=60)

    assert fresh.json()["status"] == "ignored"  # its own notification starts a new object
    assert job_started(again), again.text
    assert [t.context.run_id for t in second] == [layout.run_id_for(sha, changed.sha256())]
    assert second[0].context.run_id != first.context.run_id
    assert second[0].context.request_id == "again"
