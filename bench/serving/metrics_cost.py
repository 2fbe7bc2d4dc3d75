"""The predictor's metrics: cost of one observe() (on the predict path) and of one /metrics
page, for the ServingMetrics of a base commit (default: the hand-written text renderer) and
the one checked out (prometheus_client), in the same process.

    uv run --frozen python bench/serving/metrics_cost.py [base-commit]
"""

from __future__ import annotations

import subprocess
import sys
import time
import types

from mlpipe_predictor import monitoring as current

BASE = sys.argv[1] if len(sys.argv) > 1 else "7cf8261"


def load_base() -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{BASE}:services/predictor/src/mlpipe_predictor/monitoring.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("base_monitoring")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{BASE}:monitoring.py", "exec"), module.__dict__)
    return module


def measure(module: types.ModuleType, n: int = 200_000, pages: int = 200) -> tuple[float, float]:
    metrics = module.ServingMetrics()
    t0 = time.perf_counter()
    for _ in range(n):
        metrics.observe("iris-classifier", "1", 0.0002, True, 1)
    observe_us = (time.perf_counter() - t0) / n * 1e6
    for version in range(20):
        metrics.observe("iris-classifier", str(version + 2), 0.001, True, 1)
    t0 = time.perf_counter()
    for _ in range(pages):
        metrics.render({"sampled": 1, "dropped": 0})
    return observe_us, (time.perf_counter() - t0) / pages * 1e3


if __name__ == "__main__":
    results = {"base": measure(load_base()), "current": measure(current)}
    for name, (observe_us, page_ms) in results.items():
        print(
            f"{name:8s} observe {observe_us:6.2f} us/request   "
            f"/metrics (21 series) {page_ms:6.3f} ms"
        )
    print(
        f"ratio    observe {results['current'][0] / results['base'][0]:.1f}x   "
        f"/metrics {results['current'][1] / results['base'][1]:.1f}x"
    )
