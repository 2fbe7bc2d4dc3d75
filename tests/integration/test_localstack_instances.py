"""`mlpipe up --instances 3`: three instances of each service behind one haproxy per service.
Every predictor instance follows the registry by itself, the canary's share holds across them,
and a canary's automatic promotion happens once, counted over every instance.

Each test prints its figures (`-s` shows them)."""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud import pubsub_v1
from typer.testing import CliRunner

from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import PipelineConfig, parse_config
from mlpipe.store import layout
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client
from mlpipe.v1 import events_pb2
from mlpipe_ops import balancer, statedir
from mlpipe_ops.cli import app
from mlpipe_ops.follow import EventWatcher
from mlpipe_ops.localstack import LocalStack, StackError, StackState, client_env
from tests.conftest import REPO, free_base_port, unique, wait_until
from tests.integration.conftest import Cloud
from tests.integration.test_serving import SETOSA, deploy, renamed_iris, trained

pytestmark = pytest.mark.integration

N = 3
MODEL = "iris-classifier"
# The predictor's registry watch runs every second; the bound asked for is 5 s.
CONVERGENCE_SECONDS = 5.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    local = LocalStack(
        tmp_path_factory.mktemp("instances"),
        base_port=free_base_port(10 + 6 * N),
        project=unique("inst"),
        bucket=unique("inst"),
        instances=N,
    )
    state = local.up(progress=lambda _: None)
    try:
        with client_env(state):
            yield state
    finally:
        local.down(progress=lambda _: None)


@pytest.fixture(scope="module")
def cloud(stack: StackState) -> Iterator[Cloud]:
    subscriber = pubsub_v1.SubscriberClient()
    yield Cloud(
        stack.project,
        Storage(make_client(stack.project), stack.bucket),
        Publisher(stack.project),
        subscriber,
    )
    subscriber.close()


@pytest.fixture(scope="module")
def iris() -> tuple[PipelineConfig, str]:
    return (
        parse_config((REPO / "examples/iris/pipeline.yaml").read_text()),
        (REPO / "examples/iris/iris.csv").read_text(),
    )


@pytest.fixture(scope="module")
def champion(cloud: Cloud, iris: tuple[PipelineConfig, str]) -> events_pb2.DeploymentCompleted:
    """v1 deployed by the deployer's real step (its DeploymentCompleted reaches one instance)."""
    config, csv_text = iris
    return deploy(cloud, trained(cloud, config, csv_text))


def served_by_each(stack: StackState) -> list[dict[str, Any]]:
    """What each predictor instance serves, asked at its own port."""
    return [
        httpx.get(f"{url}/v1/models", timeout=5).json()["models"].get(MODEL, {})
        for url in stack.instance_urls("predictor")
    ]


def traffic_of(served: dict[str, Any]) -> list[tuple[int, int]]:
    return [(t["version"], t["percent"]) for t in served.get("traffic", [])]


def converge(stack: StackState, expected: list[tuple[int, int]], timeout: float = 30.0) -> float:
    """Seconds until every instance serves `expected` ((version, percent) per share); past
    the bound asked for, each instance's watch and its log say where the time went."""
    started = time.monotonic()
    try:
        wait_until(
            lambda: all(traffic_of(s) == expected for s in served_by_each(stack)),
            timeout,
            f"every instance serving {expected}",
        )
    finally:
        took = time.monotonic() - started
        if took > CONVERGENCE_SECONDS:
            print(f"\n{took:.1f} s to serve {expected}:\n{watch_report(stack)}")
    return took


def watch_report(stack: StackState) -> str:
    """Each predictor instance's registry watch (from `GET /v1/models`) and the last lines
    its log wrote about what it serves."""
    lines = []
    for i, url in enumerate(stack.instance_urls("predictor"), start=1):
        try:
            answer = httpx.get(f"{url}/v1/models", timeout=5).json()
            lines.append(
                f"predictor-{i}: {traffic_of(answer['models'].get(MODEL, {}))} "
                f"watch {answer['watch']}"
            )
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            lines.append(f"predictor-{i}: unreadable ({exc})")
        log_file = Path(stack.state_dir, "logs", f"predictor-{i}.log")
        said = [
            line[:300]
            for line in log_file.read_text(errors="replace").splitlines()
            if "registry watch" in line or "now serving" in line or "canary" in line
        ]
        lines += [f"  {line}" for line in said[-8:]]
    return "\n".join(lines)


def predict(client: httpx.Client) -> str:
    reply = client.post("/predict", json={"instances": [SETOSA]})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["modelVersionId"])


def test_each_service_runs_n_instances_behind_one_balanced_url(
    stack: StackState, cloud: Cloud, champion: events_pb2.DeploymentCompleted
) -> None:
    converge(stack, [(1, 100)])
    instances = [p for p in stack.processes if p.service]
    before = [requests_served(url) for url in stack.instance_urls("predictor")]

    with httpx.Client(base_url=stack.url("predictor"), timeout=10) as client:
        answered = Counter(predict(client) for _ in range(60))
    after = [requests_served(url) for url in stack.instance_urls("predictor")]

    per_instance = [a - b for a, b in zip(after, before, strict=True)]
    print(f"\nround robin over {N} predictor instances: {per_instance} of 60 requests")
    assert sorted(stack.instance_ports) == sorted(stack.service_ports) and stack.instances == N
    assert Counter(p.service for p in instances) == {s: N for s in stack.service_ports}
    assert all(p.alive() for p in stack.processes)
    assert any(p.name == "haproxy" for p in stack.processes)
    config = Path(stack.state_dir, balancer.CONFIG_DIR, balancer.CONFIG_FILE).read_text()
    assert config.count("balance roundrobin") == len(stack.service_ports)
    for service, port in stack.service_ports.items():
        assert httpx.get(f"{stack.url(service)}/healthz", timeout=5).status_code == 200
        assert f"bind 127.0.0.1:{port}" in config
    assert answered == {"1": 60}
    assert per_instance == [20] * N  # round robin: each instance its turn
    shown = CliRunner().invoke(app, ["status", "--state-dir", stack.state_dir]).output
    assert f"{N} instances of each service behind haproxy" in shown
    for proc in instances:
        assert f"{proc.name:<16} pid {proc.pid}  port {proc.port}  up" in shown


def requests_served(url: str) -> int:
    serving = httpx.get(f"{url}/v1/monitoring", timeout=5).json()["serving"]
    return sum(int(s["requests"]) for s in serving.values())


@pytest.fixture(scope="module")
def canary(
    cloud: Cloud, iris: tuple[PipelineConfig, str], champion: events_pb2.DeploymentCompleted
) -> events_pb2.DeploymentCompleted:
    """v2 as a 20% canary by the deployer's real step: its push reaches one instance only."""
    config, csv_text = iris
    return deploy(cloud, trained(cloud, config, renamed_iris(csv_text)), canary_percent=20)


def test_every_instance_follows_the_registry_within_seconds_push_or_not(
    stack: StackState, cloud: Cloud, canary: events_pb2.DeploymentCompleted
) -> None:
    registry = Registry(cloud.storage)
    # The deployment's DeploymentCompleted was pushed to one instance; the others follow.
    after_deployment = converge(stack, [(1, 80), (2, 20)])
    # Registry steps that publish nothing: no instance gets a push at all.
    registry.rollback(MODEL)
    after_rollback = converge(stack, [(1, 100)])
    registry.start_canary(MODEL, 2, 25)
    after_canary = converge(stack, [(1, 75), (2, 25)])

    figures = {
        "deployment_s": round(after_deployment, 2),
        "rollback_without_push_s": round(after_rollback, 2),
        "canary_without_push_s": round(after_canary, 2),
    }
    print(f"\nconvergence of {N} instances: {figures}")
    # The figure asked for (5 s): loose enough for a loaded machine, still far below "never".
    assert max(figures.values()) < 3 * CONVERGENCE_SECONDS


def test_the_canary_share_holds_across_instances(
    stack: StackState, cloud: Cloud, canary: events_pb2.DeploymentCompleted
) -> None:
    registry = Registry(cloud.storage)
    registry.rollback(MODEL)
    registry.start_canary(MODEL, 2, 25)
    converge(stack, [(1, 75), (2, 25)])

    with httpx.Client(base_url=stack.url("predictor"), timeout=10) as client:
        answered = Counter(predict(client) for _ in range(2000))

    share = 100 * answered["2"] / 2000
    print(f"\ncanary share over 2000 requests through the balancer: {share:.2f}% (asked 25%)")
    assert set(answered) == {"1", "2"}
    assert abs(share - 25) <= 3


def test_a_canary_is_promoted_once_on_the_counts_of_every_instance(
    stack: StackState, cloud: Cloud, canary: events_pb2.DeploymentCompleted
) -> None:
    registry = Registry(cloud.storage)
    registry.rollback(MODEL)
    promote_after = 90
    registry.start_canary(MODEL, 2, 50, promote_after=promote_after)
    _, round_id = registry.traffic_round(MODEL)
    converge(stack, [(1, 50), (2, 50)])

    sent = 0
    with (
        EventWatcher(stack.project, topics=(events.DEPLOYMENT_COMPLETED,)) as watcher,
        httpx.Client(base_url=stack.url("predictor"), timeout=10) as client,
    ):
        while registry.traffic(MODEL).champion != 2 and sent < 2000:
            predict(client)
            sent += 1
        promoted_at = sent
        time.sleep(2 * CONVERGENCE_SECONDS)  # time for a second promotion, were there one
        promotions = [
            o.event
            for o in watcher.events(timeout=2)
            if isinstance(o.event, events_pb2.DeploymentCompleted)
            and o.event.requested_by == "predictor"
        ]
    counts = {
        path.rsplit("/", 1)[-1]: cloud.storage.read_json(path)["succeeded"]
        for path in cloud.storage.list(layout.RegistryPaths(MODEL).canary_counts(round_id))
    }
    markers = cloud.storage.list(layout.RegistryPaths(MODEL).promotion(round_id))

    print(
        f"\npromotion after {promote_after} canary successes: requests sent {promoted_at}, "
        f"canary successes per instance {sorted(counts.values())}, promotions {len(promotions)}"
    )
    assert registry.traffic(MODEL).shares() == [(2, 100, "champion")]
    assert len(promotions) == 1 and events.rollout_action(promotions[0]) == "promote"
    assert promotions[0].version == 2
    assert len(markers) == 1
    # Every instance counted part of it; none alone reached the bound: the counts were shared.
    assert len(counts) == N and all(0 < c < promote_after for c in counts.values())
    assert sum(counts.values()) >= promote_after
    converge(stack, [(2, 100)])


def test_a_balancer_that_refuses_its_configuration_is_named_with_its_line(
    tmp_path: Path,
) -> None:
    config = balancer.write_config(tmp_path, {"predictor": 1}, {"predictor": [2, 3]})
    config.write_text(config.read_text().replace("balance roundrobin", "balance nonsense"))

    with pytest.raises(balancer.BalancerError) as refused:
        balancer.check(config)

    message = str(refused.value)
    assert str(config) in message and "balance nonsense" in message
    line = next(i for i, t in enumerate(config.read_text().splitlines(), 1) if "nonsense" in t)
    assert f"{config}:{line}:" in message


def test_a_stack_whose_balancer_cannot_bind_stops_naming_it(tmp_path: Path) -> None:
    base = free_base_port(10 + 6 * 2)
    local = LocalStack(
        tmp_path / "state",
        base_port=base,
        project=unique("lb"),
        bucket=unique("lb"),
        instances=2,
    )
    # A port the balancer must bind is taken after the stack's own port check (a race
    # the check cannot see): haproxy exits, and the start names it and its log.
    original = local._check_ports

    def check_then_take() -> None:
        original()
        holder.bind(("127.0.0.1", base + 6))
        holder.listen()

    holder = socket.socket()
    local._check_ports = check_then_take  # type: ignore[method-assign]
    try:
        with pytest.raises(StackError) as failed:
            local.up(progress=lambda _: None, timeout=120)
    finally:
        holder.close()
    assert "haproxy" in str(failed.value) and "log" in str(failed.value)
    assert StackState.load(tmp_path / "state") is None  # what was started was stopped
    # ...all of it: no instance the services' starter forked is left holding the logs.
    # (The stack's SIGKILL comes 10 s after its SIGTERM; what still holds the state after
    # that is named.)
    try:
        wait_until(lambda: not statedir.processes_using(tmp_path / "state"), 30, "orphans stopped")
    except AssertionError:
        left = statedir.processes_using(tmp_path / "state")
        raise AssertionError(f"still holding the state directory: {left}") from None


def test_instances_must_be_one_or_more(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="1 or more"):
        LocalStack(tmp_path, instances=0)
