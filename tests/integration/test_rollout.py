"""Canary rollouts on the local target: the split served, promotion by hand and by itself,
rollback; every step a DeploymentCompleted with the split."""

from __future__ import annotations

import logging
import time
from collections import Counter

import httpx
import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.ml.config import PipelineConfig
from mlpipe.store.registry import Registry, Traffic
from mlpipe.v1 import events_pb2
from mlpipe_deployer import rollout
from mlpipe_deployer.deployment import Deployer
from mlpipe_ops.cli_rollout import describe_traffic
from tests.integration.conftest import Cloud
from tests.integration.test_serving import SETOSA, deploy, predictor, renamed_iris, trained

pytestmark = pytest.mark.integration


def split(event: events_pb2.DeploymentCompleted) -> list[tuple[int, int, str]]:
    return [(t.version, t.percent, events.model_alias(t)) for t in event.traffic]


def answered_by(url: str, n: int) -> Counter[str]:
    with httpx.Client(base_url=url) as client:
        return Counter(
            client.post("/predict", json={"instances": [SETOSA]}).json()["modelVersionId"]
            for _ in range(n)
        )


def test_a_canary_gets_its_share_then_promote_and_rollback_move_all_traffic(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, iris_config: PipelineConfig, iris_csv: str
) -> None:
    cloud.watch(events.DEPLOYMENT_COMPLETED)
    v1 = deploy(cloud, trained(cloud, iris_config, iris_csv), canary_percent=25)
    v2 = deploy(cloud, trained(cloud, iris_config, renamed_iris(iris_csv)), canary_percent=25)
    registry = Registry(cloud.storage)
    deps = Deployer(cloud.storage, cloud.publisher, registry, "test")

    with predictor(cloud, monkeypatch) as served:
        served.push(v2)
        during = answered_by(served.url, 100)
        shown = describe_traffic(registry, "iris-classifier")
        promoted = rollout.promote(deps, "iris-classifier", "test").event
        served.push(promoted)
        after_promotion = answered_by(served.url, 20)
        rolled_back = rollout.rollback(deps, "iris-classifier", "test").event
        served.push(rolled_back)
        after_rollback = answered_by(served.url, 20)

    published = cloud.pulled(events.DEPLOYMENT_COMPLETED, expect=4)
    assert (events.rollout_action(v1), events.model_alias(v1), split(v1)) == (
        "promote",
        "champion",
        [(1, 100, "champion")],
    )
    assert (events.rollout_action(v2), events.model_alias(v2), v2.previous_version) == (
        "canary",
        "canary",
        1,
    )
    assert split(v2) == [(1, 75, "champion"), (2, 25, "canary")]
    assert during == {"1": 75, "2": 25}
    assert shown == "v1 75% champion, v2 25% canary"
    assert (events.rollout_action(promoted), promoted.version, promoted.previous_version) == (
        "promote",
        2,
        1,
    )
    assert split(promoted) == [(2, 100, "champion")]
    assert promoted.requested_by == "test" and promoted.context.run_id == v2.context.run_id
    assert after_promotion == {"2": 20}
    assert (
        events.rollout_action(rolled_back),
        rolled_back.version,
        rolled_back.previous_version,
    ) == (
        "rollback",
        1,
        2,
    )
    assert split(rolled_back) == [(1, 100, "champion")]
    assert after_rollback == {"1": 20}
    assert [events.rollout_action(e) for e in published] == [
        "promote",
        "canary",
        "promote",
        "rollback",
    ]


def test_a_canary_that_serves_enough_requests_without_errors_promotes_itself(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, iris_config: PipelineConfig, iris_csv: str
) -> None:
    deploy(cloud, trained(cloud, iris_config, iris_csv))
    cloud.watch(events.DEPLOYMENT_COMPLETED)
    v2 = deploy(
        cloud,
        trained(cloud, iris_config, renamed_iris(iris_csv)),
        canary_percent=50,
        promote_after=10,
    )
    registry = Registry(cloud.storage)

    with predictor(cloud, monkeypatch) as served:
        served.push(v2)
        # Every other request is the canary's: its 10th success is the 19th request.
        answered_by(served.url, 18)
        assert registry.traffic("iris-classifier").canary == 2
        answered_by(served.url, 1)
        deadline = time.monotonic() + 10
        while registry.traffic("iris-classifier").champion != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        models = httpx.get(f"{served.url}/v1/models").json()["models"]

    published = cloud.pulled(events.DEPLOYMENT_COMPLETED, expect=2)
    promoted = published[-1]
    assert registry.traffic("iris-classifier").shares() == [(2, 100, "champion")]
    assert (events.rollout_action(promoted), promoted.requested_by, promoted.version) == (
        "promote",
        "predictor",
        2,
    )
    assert "after 10 successful predictions" in promoted.reason
    assert split(promoted) == [(2, 100, "champion")]
    assert models["iris-classifier"]["version"] == 2 and "canary" not in models["iris-classifier"]


def test_rollback_during_a_canary_stops_it_and_the_deployer_routes_say_what_cannot_be_done(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, iris_config: PipelineConfig, iris_csv: str
) -> None:
    deploy(cloud, trained(cloud, iris_config, iris_csv))
    deploy(cloud, trained(cloud, iris_config, renamed_iris(iris_csv)), canary_percent=10)
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    from mlpipe_deployer.main import app

    with TestClient(app) as deployer:
        stopped = deployer.post("/v1/models/iris-classifier:rollback")
        nothing = deployer.post("/v1/models/iris-classifier:promote")
        no_history = deployer.post("/v1/models/iris-classifier:rollback")

    assert stopped.status_code == 200
    assert stopped.json()["reason"] == "canary v2 stopped; v1 keeps 100%"
    assert stopped.json()["traffic"] == [
        {"version": "1", "percent": 100, "model_alias": "MODEL_ALIAS_CHAMPION"}
    ]
    assert nothing.status_code == 409
    assert nothing.json()["error"]["message"] == "iris-classifier has no canary to promote"
    assert no_history.status_code == 409 and "no earlier champion" in no_history.text
    assert Registry(cloud.storage).traffic("iris-classifier").shares() == [(1, 100, "champion")]


def test_the_registry_rollout_steps_never_go_back_by_accident(cloud: Cloud) -> None:
    from mlpipe.store.registry import RolloutError

    registry = Registry(cloud.storage)
    for run in ("a", "b", "c", "d"):
        registry.register("m", run * 16, run.encode(), {})
    for version in (1, 2, 3):
        registry.move_alias("m", version)

    stale = registry.start_canary("m", 4, 10)
    older = registry.start_canary("m", 3, 10)  # a late redelivery of an older deployment
    with pytest.raises(RolloutError, match="canary is v4, not v3"):
        registry.promote("m", expected=3)
    with pytest.raises(RolloutError, match=r"1\.\.99%"):
        registry.start_canary("m", 5, 100)
    registry.promote("m", expected=4)
    steps = [registry.rollback("m")[:2] for _ in range(3)]
    with pytest.raises(RolloutError, match="no earlier champion"):
        registry.rollback("m")

    assert stale == (True, None) and older == (False, 4)
    assert steps == [(3, 4), (2, 3), (1, 2)]
    assert registry.traffic("m").shares() == [(1, 100, "champion")]


def test_two_predictor_instances_count_one_canary_together_and_promote_it_once(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    from mlpipe.store import layout
    from mlpipe_predictor.models import ModelStore, RegistryWatch

    deploy(cloud, trained(cloud, iris_config, iris_csv))
    deploy(
        cloud,
        trained(cloud, iris_config, renamed_iris(iris_csv)),
        canary_percent=50,
        promote_after=10,
    )
    registry = Registry(cloud.storage)
    promoted: list[tuple[str, str, int]] = []
    instances = [ModelStore(Registry(cloud.storage)) for _ in range(2)]
    for store in instances:
        store.on_promotion = lambda m, v, s=store: promoted.append((s.instance, m, v))
        store.load_all()
    watches = [RegistryWatch(store) for store in instances]

    # 20 requests, each instance serving every other one: 5 canary successes each, so
    # neither alone reaches 10.
    for i in range(20):
        store = instances[i % 2]
        model, watch = store.route("iris-classifier")
        store.report(model.name, watch, ok=True)
    alone = [store.watch_of("iris-classifier").succeeded for store in instances]  # type: ignore[union-attr]
    for _ in range(2):  # each instance's watch round, twice
        for watch in watches:
            watch.check()
    _, round_id = registry.traffic_round("iris-classifier")
    paths = layout.RegistryPaths("iris-classifier")

    assert alone == [5, 5]
    assert len(promoted) == 1 and promoted[0][1:] == ("iris-classifier", 2)
    assert len(cloud.storage.list(paths.promotion(round_id))) == 1
    assert sorted(cloud.storage.list(paths.canary_counts(round_id))) == sorted(
        paths.canary_count(round_id, store.instance) for store in instances
    )
    assert registry.canary_counts("iris-classifier", round_id) == (10, 0)


def test_a_canary_failure_on_one_instance_stops_every_instance_promoting_it(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    from mlpipe_predictor.models import ModelStore, RegistryWatch

    deploy(cloud, trained(cloud, iris_config, iris_csv))
    deploy(
        cloud,
        trained(cloud, iris_config, renamed_iris(iris_csv)),
        canary_percent=50,
        promote_after=4,
    )
    promoted: list[int] = []
    first, second = (ModelStore(Registry(cloud.storage)) for _ in range(2))
    for store in (first, second):
        store.on_promotion = lambda m, v: promoted.append(v)
        store.load_all()
    canary = first.watch_of("iris-classifier")
    assert canary is not None
    first.report("iris-classifier", canary, ok=False)
    RegistryWatch(first).check()  # its failure is written for the others to see

    for _ in range(20):
        model, watch = second.route("iris-classifier")
        second.report(model.name, watch, ok=True)
    RegistryWatch(second).check()
    time.sleep(1)  # a check the requests started in a thread of its own has ended too

    assert promoted == []
    assert Registry(cloud.storage).traffic("iris-classifier").canary == 2


def test_a_watch_round_that_read_the_registry_mid_write_is_corrected_next_round(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    from mlpipe_predictor.models import ModelStore, RegistryWatch

    deploy(cloud, trained(cloud, iris_config, iris_csv))
    deploy(cloud, trained(cloud, iris_config, renamed_iris(iris_csv)), canary_percent=20)
    store = ModelStore(Registry(cloud.storage))
    store.load_all()
    watch = RegistryWatch(store)
    watch.check()
    before = store.shares("iris-classifier")
    Registry(cloud.storage).rollback("iris-classifier")  # the canary stopped: v1 100 %
    # This round lists the new aliases but reads the traffic as it was before the write.
    fresh = store.registry.traffic_round
    store.registry.traffic_round = lambda name: (Traffic(1, 2, 20), 1)  # type: ignore[method-assign]
    watch.check()
    raced = store.shares("iris-classifier")
    store.registry.traffic_round = fresh  # type: ignore[method-assign]
    watch.check()  # the aliases did not change again

    assert before == [(1, "champion", 80), (2, "canary", 20)]
    assert raced == before
    assert store.shares("iris-classifier") == [(1, "champion", 100)]


def test_a_watch_round_is_timed_and_a_failed_one_is_counted_with_its_error(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str, caplog: pytest.LogCaptureFixture
) -> None:
    from mlpipe.store.storage import Storage
    from mlpipe_predictor.models import ModelStore, RegistryWatch

    deploy(cloud, trained(cloud, iris_config, iris_csv))
    watch = RegistryWatch(ModelStore(Registry(cloud.storage)))
    watch.round()
    good = watch.status.as_dict()
    # The same watch over a bucket that does not exist: every round fails, and says why.
    missing = Storage(cloud.storage.client, "no-such-bucket-" + cloud.storage.bucket_name)
    broken = RegistryWatch(ModelStore(Registry(missing)))
    with caplog.at_level(logging.WARNING, logger="mlpipe_predictor.models"):
        broken.round()
        broken.round()

    assert good["rounds"] == 1 and good["failures"] == 0 and good["last_error"] == ""
    assert good["last_round_at"] and good["last_round_seconds"] > 0
    assert set(good["last_round_parts"]) == {"list", "refresh", "settle", "record"}
    assert good["last_round_parts"]["refresh"] > 0  # the first round loads what is served
    assert broken.status.rounds == 2 and broken.status.failures == 2
    assert "NotFound" in broken.status.last_error
    assert sum("round failed" in r.message for r in caplog.records) == 2


def test_each_watching_instance_records_what_it_serves_and_silent_ones_are_dropped(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    import datetime as dt

    from mlpipe.store import layout
    from mlpipe_predictor import models
    from mlpipe_predictor.models import ModelStore, RegistryWatch

    name = "iris-classifier"
    deploy(cloud, trained(cloud, iris_config, iris_csv))
    deploy(cloud, trained(cloud, iris_config, renamed_iris(iris_csv)), canary_percent=20)
    registry = Registry(cloud.storage)
    # Rounds run here one by one (the threads' own would come after an hour).
    watches = [
        RegistryWatch(
            ModelStore(Registry(cloud.storage)), 3600, about={"revision": f"predictor-r{i}"}
        )
        for i in range(2)
    ]
    for watch in watches:
        watch.start()
    for watch in watches:
        watch.round()
    first = {r["instance"]: r for r in registry.instances(name)}
    written = cloud.storage.read(layout.RegistryPaths(name).instance(watches[0].store.instance))
    watches[0].round()  # nothing changed and no heartbeat due: not written again
    unchanged = cloud.storage.read(layout.RegistryPaths(name).instance(watches[0].store.instance))
    registry.rollback(name)
    for watch in watches:
        watch.round()
    after = {r["instance"]: r for r in registry.instances(name)}
    # A killed instance's record falls silent; the next backstop round of another drops it.
    cloud.storage.write_json(
        layout.RegistryPaths(name).instance("killed"),
        {
            "serving": [],
            "updated_at": (dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)).isoformat(),
        },
    )
    watches[0].rounds = models.BACKSTOP_ROUNDS - 1
    watches[0].round()
    watches[1].stop()  # as the service's shutdown stops it
    final = {r["instance"]: r for r in registry.instances(name)}

    ids = [w.store.instance for w in watches]
    assert sorted(first) == sorted(ids)
    for i, instance in enumerate(ids):
        assert first[instance]["serving"] == [
            {"version": 1, "alias": "champion", "percent": 80},
            {"version": 2, "alias": "canary", "percent": 20},
        ]
        assert first[instance]["revision"] == f"predictor-r{i}"
        assert first[instance]["canary"]["version"] == 2
        assert after[instance]["serving"] == [{"version": 1, "alias": "champion", "percent": 100}]
        assert after[instance]["canary"] is None
    assert written is not None and unchanged is not None
    assert unchanged.generation == written.generation
    assert "killed" not in final and sorted(final) == sorted(ids)
    assert final[ids[1]]["stopped_at"] and not final[ids[0]]["stopped_at"]
    watches[0].stop()
