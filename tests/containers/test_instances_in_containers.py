"""`mlpipe up --containers --instances 2`: two containers of each shipped image behind one
haproxy per service, as Cloud Run scales a service out, and the chain through them.

Needs a Docker engine and haproxy (`make test-containers` and .ci/run provide both).
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from mlpipe_ops.localstack import LocalStack, StackState, client_env
from mlpipe_ops.service_runtime import load_runtimes
from tests.conftest import engine_missing, free_base_port, unique, wait_until
from tests.containers.test_stack_in_containers import cli

pytestmark = pytest.mark.containers
INSTANCES = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    missing = engine_missing() or ("" if shutil.which("haproxy") else "haproxy is not installed")
    if missing:
        pytest.skip(missing)
    services = len(load_runtimes("local"))
    local = LocalStack(
        tmp_path_factory.mktemp("instances"),
        # The emulators, each service's balancer and instances, the two stand-ins' ports.
        base_port=free_base_port(2 + services * (1 + INSTANCES) + 2),
        project=unique("ctrn"),
        bucket=unique("ctrn"),
        containers=True,
        instances=INSTANCES,
    )
    state = local.up(progress=print, timeout=300)
    try:
        with client_env(state):
            yield state
    finally:
        local.down(progress=print)
        left = [c.name for c in state.containers if c.inspect() is not None]
        assert left == [], f"containers left after down: {left}"


def test_each_image_runs_twice_each_instance_on_its_own_port(stack: StackState) -> None:
    runtimes = load_runtimes("local")

    assert Counter(c.service for c in stack.containers) == {s: INSTANCES for s in runtimes}
    for service in runtimes:
        ports = sorted(c.port for c in stack.containers if c.service == service)
        assert ports == sorted(stack.instance_ports[service])
        assert stack.service_ports[service] not in ports  # the balancer's own port
        for port in ports:
            reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert reply.json() == {"status": "ok", "service": service}


def test_iris_runs_through_the_balancers_and_every_predictor_instance_serves_it(
    stack: StackState,
) -> None:
    result = cli(stack, "run", "--example", "iris", "--timeout", "240")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "serving iris-classifier v1" in result.stdout

    def every_instance_serves_v1() -> bool:
        for port in stack.instance_ports["predictor"]:
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["models"]
            if {name: m["version"] for name, m in models.items()} != {"iris-classifier": 1}:
                return False
        return True

    # The instance that did not receive DeploymentCompleted follows the registry by itself.
    wait_until(every_instance_serves_v1, 10, "both predictor instances serving v1")
    balanced = [
        httpx.post(
            f"{stack.url('predictor')}/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}
        ).json()
        for _ in range(10)
    ]
    assert {(b["model"], b["modelVersionId"], b["predictions"][0]) for b in balanced} == {
        ("iris-classifier", "1", "setosa")
    }
