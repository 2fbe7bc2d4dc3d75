"""The GCS registry under concurrency: one version per run, whoever delivers it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from mlpipe.errors import TransientError
from mlpipe.store.registry import Registry
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration


def register_retrying(registry: Registry, model: str, run_id: str, artifact: bytes) -> int:
    """What Pub/Sub does for a 503: deliver again until it succeeds."""
    for _ in range(200):
        try:
            return registry.register(model, run_id, artifact, {})[0].version
        except TransientError:
            continue
    raise AssertionError("never registered")


def test_concurrent_deliveries_of_one_run_register_one_version(cloud: Cloud) -> None:
    registry = Registry(cloud.storage)

    with ThreadPoolExecutor(8) as pool:
        versions = list(
            pool.map(lambda _: register_retrying(registry, "m", "run-a", b"A"), range(8))
        )

    assert set(versions) == {1}
    assert registry.versions("m") == [1]
    assert registry.version_for_run("m", "run-a") == 1


def test_concurrent_runs_get_distinct_versions(cloud: Cloud) -> None:
    registry = Registry(cloud.storage)
    runs = [f"run-{i}" for i in range(6)]

    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(lambda r: register_retrying(registry, "m", r, r.encode()), runs))

    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    for run, version in zip(runs, versions, strict=True):
        mv = registry.get("m", version)
        assert mv is not None and mv.run_id == run
        assert registry.load_artifact(mv) == run.encode()


def test_alias_only_moves_forward(cloud: Cloud) -> None:
    registry = Registry(cloud.storage)
    for run in ("a", "b"):
        registry.register("m", run, run.encode(), {})

    assert registry.move_alias("m", 2) == (True, None)
    assert registry.move_alias("m", 1) == (False, 2)
    assert registry.move_alias("m", 2) == (False, 2)
    assert registry.alias("m") == 2


def test_a_tampered_artifact_is_refused(cloud: Cloud) -> None:
    registry = Registry(cloud.storage)
    mv, _ = registry.register("m", "a", b"genuine", {})
    cloud.storage.write(cloud.storage.path_of(mv.model_uri), b"tampered")

    with pytest.raises(ValueError, match="refusing"):
        registry.load_artifact(mv)
