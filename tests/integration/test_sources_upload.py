"""Direct uploads into datasets/<name>/: the trainer checks them against the schema before any
job; a bad file is copied to quarantine/<reason>/ with a PipelineFailed naming it, a good one
trains."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.ml.config import PipelineConfig
from tests.integration.conftest import Cloud, job_started, notification

pytestmark = pytest.mark.integration


def test_a_bad_upload_is_quarantined_and_a_good_one_trains(
    services: dict[str, TestClient], cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    cloud.apply_config(iris_config)
    lines = iris_csv.splitlines()
    bad_csv = "\n".join([*lines[:5], "5.0,wide,1.4,0.2,setosa", *lines[5:]]) + "\n"
    bad_path = "datasets/iris/dt=2026-11-23/bad.csv"
    good_path = "datasets/iris/dt=2026-11-23/good.csv"
    bad_gen = cloud.storage.write(bad_path, bad_csv.encode(), content_type="text/csv")
    good_gen = cloud.storage.write(good_path, iris_csv.encode(), content_type="text/csv")

    rejected = services["trainer"].post(
        "/pubsub/push", content=notification(cloud, bad_path, bad_gen, "n-bad")
    )
    started = services["trainer"].post(
        "/pubsub/push", content=notification(cloud, good_path, good_gen, "n-good")
    )

    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert [f.reason for f in failed] == ["wrong_type"]
    assert cloud.storage.uri(bad_path) in failed[0].message
    assert "'sepal_width'" in failed[0].message and "'wide'" in failed[0].message
    assert events.pipeline_stage(failed[0]) == "trainer"
    assert failed[0].quarantine_uri.startswith(cloud.storage.uri("quarantine/wrong_type/"))
    kept = cloud.storage.read(cloud.storage.path_of(failed[0].quarantine_uri), with_metadata=True)
    assert kept is not None and kept.data == bad_csv.encode()
    assert kept.metadata["object"] == cloud.storage.uri(bad_path)
    assert job_started(started), started.text
    trained = cloud.pulled(events.TRAINING_COMPLETED, timeout=60)
    assert [t.dataset.uri for t in trained] == [cloud.storage.uri(good_path)]
