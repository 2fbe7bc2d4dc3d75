"""A failed Earth Engine export publishes PipelineFailed on the emulator (the task states are
scripted: the real Earth Engine client is not installed)."""

from __future__ import annotations

import pytest

from mlpipe.messaging import events
from mlpipe_ingest.sources_earthengine import export
from tests.integration.conftest import Cloud
from tests.unit.test_sources_earthengine import SPEC, Clock, ScriptedTasks

pytestmark = pytest.mark.integration


def test_a_failed_export_is_reported(cloud: Cloud) -> None:
    cloud.watch(events.PIPELINE_FAILURES)
    tasks = ScriptedTasks({"state": "RUNNING"}, {"state": "FAILED", "error_message": "quota"})
    clock = Clock()

    files = export(
        tasks, SPEC, cloud.reporter("earthengine"), timeout=600, clock=clock, sleep=clock.sleep
    )

    assert files is None
    assert tasks.started[0]["fileNamePrefix"] == SPEC.file_prefix
    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert [(events.pipeline_stage(f), f.reason) for f in failed] == [
        ("earthengine", "ee_task_failed")
    ]
    assert "T1" in failed[0].message and "quota" in failed[0].message
