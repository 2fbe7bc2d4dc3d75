"""The fault suite's figures: each test adds to FIGURES; the session summary prints them."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

FIGURES: dict[str, Any] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    figures = dict(FIGURES)
    # Figures kept by other modules of the suite in their own FIGURES.
    for name, module in list(sys.modules.items()):
        if name.startswith("tests.faults.") and name != __name__:
            figures.update(getattr(module, "FIGURES", {}) or {})
    if figures:
        terminalreporter.write_sep("=", "fault suite figures")
        terminalreporter.write_line(json.dumps(figures, sort_keys=True))


@pytest.fixture
def figures() -> dict[str, Any]:
    return FIGURES
