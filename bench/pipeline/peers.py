"""The same three steps (load the iris CSV → RandomForestClassifier(n_estimators=100,
random_state=0) → accuracy on a 20% stratified holdout) on the peers, timed from the outside.

    uv run --frozen python bench/pipeline/peers.py --runs 5

- KFP v2, local: flows/iris_kfp.py, kfp.local.SubprocessRunner, three components passing
  artifacts; in bench/.venvs/kfp.
- Metaflow, local: flows/iris_metaflow.py, three steps, local datastore and metadata under /tmp;
  in bench/.venvs/metaflow.
- bare: flows/iris_bare.py, the three plain functions; the process timed from the outside
  (cold: interpreter and imports included) and the three calls timed inside it (warm).

Each venv is made here with uv from PyPI (never the project's lock), on the project's
interpreter, with the same scikit-learn and pandas versions as the project, and its modules
compiled to bytecode once. A run is the whole `python …` subprocess, wall clock. The peers take
turns within each round, so load from other work on the machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import IRIS_DIR, Series, ensure_venv, installed_versions

FLOWS = Path(__file__).resolve().parent / "flows"
CSV = IRIS_DIR / "iris.csv"
# The project's own versions, so every peer fits the same scikit-learn on the same pandas.
SHARED = [
    f"scikit-learn=={importlib.metadata.version('scikit-learn')}",
    f"pandas=={importlib.metadata.version('pandas')}",
]
KFP_SPEC = os.environ.get("MLPIPE_BENCH_KFP_SPEC", "kfp==2.17.0")
METAFLOW_SPEC = os.environ.get("MLPIPE_BENCH_METAFLOW_SPEC", "metaflow==2.19.39")


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd, cwd=FLOWS, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {done.returncode}:\n{tail}")
    return seconds, done.stdout


def run_peers(runs: int, work_dir: Path, progress: Any = print) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    progress("peers: making bench/.venvs/kfp and bench/.venvs/metaflow (uv, PyPI) if needed")
    kfp_python = ensure_venv("kfp", [KFP_SPEC, *SHARED], "import kfp, sklearn, pandas")
    mf_python = ensure_venv("metaflow", [METAFLOW_SPEC, *SHARED], "import metaflow, sklearn")
    versions = {
        "kfp": installed_versions(kfp_python, ["kfp", "scikit-learn", "pandas"]),
        "metaflow": installed_versions(mf_python, ["metaflow", "scikit-learn", "pandas"]),
    }
    mf_env = {
        **os.environ,
        "METAFLOW_DEFAULT_DATASTORE": "local",
        "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(work_dir / "metaflow"),
        "USERNAME": os.environ.get("USERNAME", "bench"),
    }
    kfp = Series("KFP local (SubprocessRunner)")
    metaflow = Series("Metaflow local")
    bare_cold = Series("bare, one process (cold)")
    bare_warm = Series("bare, in process (warm)")
    accuracy: dict[str, float] = {}
    for i in range(runs):
        seconds, _ = _timed(
            [str(kfp_python), "iris_kfp.py", "--csv", str(CSV), "--root", str(work_dir / "kfp")]
        )
        kfp.add(seconds)
        seconds, out = _timed(
            [str(mf_python), "iris_metaflow.py", "--quiet", "run", "--csv", str(CSV)], mf_env
        )
        metaflow.add(seconds)
        if "accuracy" in out:
            accuracy["metaflow"] = float(out.rsplit("accuracy", 1)[1].split()[0])
        seconds, out = _timed([str(kfp_python), "iris_bare.py", str(CSV)])
        bare_cold.add(seconds)
        inner = json.loads(out.strip().splitlines()[-1])
        bare_warm.add(inner["in_process_seconds"])
        accuracy["bare"] = inner["accuracy"]
        progress(
            f"  round {i + 1}: KFP {kfp.seconds[-1]:.2f}s  Metaflow {metaflow.seconds[-1]:.2f}s"
            f"  bare {bare_cold.seconds[-1]:.2f}s (in process {bare_warm.seconds[-1]:.3f}s)"
            f"  load {kfp.loads[-1]}"
        )
    return {
        "versions": versions,
        "accuracy": accuracy,
        "series": {
            "kfp": kfp.summary(),
            "metaflow": metaflow.summary(),
            "bare_cold": bare_cold.summary(),
            "bare_warm": bare_warm.summary(),
        },
    }


def print_peers(result: dict[str, Any]) -> None:
    print("\npeers, whole run timed from the outside:")
    for s in result["series"].values():
        print(
            f"  {s['name']:<32} n={s['n']} p50 {s['p50']:.3f}s p95 {s['p95']:.3f}s"
            f"  (load {s['load_min']}..{s['load_max']})"
        )
    print(f"  versions {result['versions']}  accuracy {result['accuracy']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="mlpipe-bench-peers-"))
    result = run_peers(args.runs, work_dir)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print_peers(result)


if __name__ == "__main__":
    main()
