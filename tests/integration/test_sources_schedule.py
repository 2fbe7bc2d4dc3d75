"""`mlpipe schedule run`: a schedule from an environment file is published to the emulator's
ingest topic as the IngestRequest Cloud Scheduler would send."""

from __future__ import annotations

import pytest

from mlpipe.messaging import events
from mlpipe_ops.cli_schedule import find_schedule, fire
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration


def test_a_dev_schedule_fires_its_request_on_the_emulator(cloud: Cloud) -> None:
    cloud.watch(events.INGEST_REQUESTS)
    schedule = find_schedule("dev", "mlpipe-iris-smoke")

    request_id = fire(schedule, cloud.publisher)

    published = cloud.pulled(events.INGEST_REQUESTS)
    assert [r.request_id for r in published] == [request_id]
    assert published[0].dataset == "iris" and published[0].inline.csv
    assert request_id.startswith("mlpipe-iris-smoke-")
    assert published[0].HasField("requested_at")
