"""The training job's data path at 10k, 100k and 1M rows against bare pandas + scikit-learn.

    uv run --frozen python bench/pipeline/scale.py --repeats 3

A synthetic regression dataset (10 numeric features, a noisy non-linear target) as Parquet
bytes in memory. mlpipe: mlpipe.ml.data.read_dataset → check_dataset → split_rows →
frame.iloc[train] → mlpipe.ml.modeling.build_pipeline(config, features).fit, with the config
parsed from the YAML below (HistGradientBoostingRegressor). Bare: pd.read_parquet →
HistGradientBoostingRegressor(same params).fit on as many rows as mlpipe trains on (the first
80%). Early stopping is off so both fit exactly max_iter trees whatever rows they get. The two
take turns within each repeat, after one untimed warm-up of each; the p50 of the repeats is
reported, each with the load average. OpenMP is held to --threads (default 1) for both: with
other work on a 2-core machine, two spinning OpenMP threads make single fits vary several-fold.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import load, p50_p95
from sklearn.ensemble import HistGradientBoostingRegressor
from threadpoolctl import threadpool_limits

from mlpipe.ml.config import parse_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.modeling import build_pipeline
from mlpipe.ml.split import split_rows
from mlpipe.ml.validation import check_dataset

CONFIG = """
name: synthetic
dataset:
  target: y
split:
  holdout_fraction: 0.2
  seed: 42
model:
  name: synthetic-regressor
  task: regression
  estimator: sklearn.ensemble.HistGradientBoostingRegressor
  params:
    max_iter: 100
    random_state: 0
    early_stopping: false
"""
# The same pipeline without the default median imputer (HistGradientBoosting takes NaN itself).
CONFIG_NO_IMPUTE = (
    CONFIG
    + """  preprocessing:
    impute: none
"""
)
FEATURES = 10
SIZES = (10_000, 100_000, 1_000_000)


def synthetic_parquet(rows: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES))
    weights = rng.normal(size=FEATURES)
    y = x @ weights + np.sin(3 * x[:, 0]) * x[:, 1] + rng.normal(scale=0.5, size=rows)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(FEATURES)]).assign(y=y)
    out = io.BytesIO()
    frame.to_parquet(out, index=False)
    return out.getvalue()


def mlpipe_path(data: bytes, config: Any) -> dict[str, float]:
    """The training job's steps (mlpipe_trainer.training.train, storage aside), each timed."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    frame = read_dataset(data, "parquet", "bench.parquet")
    t["read"] = time.perf_counter() - t0
    mark = time.perf_counter()
    features = check_dataset(frame, config, "bench.parquet")
    t["check"] = time.perf_counter() - mark
    mark = time.perf_counter()
    split = split_rows(frame, config)
    t["split"] = time.perf_counter() - mark
    mark = time.perf_counter()
    estimator = build_pipeline(config, features)
    train_frame = frame.iloc[split.train]
    y_train = train_frame[config.dataset.target]
    t["select"] = time.perf_counter() - mark
    mark = time.perf_counter()
    estimator.fit(train_frame[features], y_train)
    t["fit"] = time.perf_counter() - mark
    t["total"] = time.perf_counter() - t0
    # Not in the timed path, but the job does it next: split.json is the row lists as JSON.
    mark = time.perf_counter()
    t["split_json_bytes"] = float(len(json.dumps(split.to_json())))
    t["split_json_encode"] = time.perf_counter() - mark
    return t


def bare_path(data: bytes, params: dict[str, Any], train_rows: int) -> dict[str, float]:
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    frame = pd.read_parquet(io.BytesIO(data))
    t["read"] = time.perf_counter() - t0
    mark = time.perf_counter()
    rows = frame.iloc[:train_rows]
    HistGradientBoostingRegressor(**params).fit(rows.drop(columns="y"), rows["y"])
    t["fit"] = time.perf_counter() - mark
    t["total"] = time.perf_counter() - t0
    return t


def run_scale(
    repeats: int, sizes: tuple[int, ...] = SIZES, threads: int = 1, progress: Any = print
) -> dict[str, Any]:
    with threadpool_limits(limits=threads):
        result = _run_scale(repeats, sizes, progress)
    result["threads"] = threads
    return result


def _run_scale(repeats: int, sizes: tuple[int, ...], progress: Any) -> dict[str, Any]:
    config = parse_config(CONFIG, source="scale.py")
    no_impute = parse_config(CONFIG_NO_IMPUTE, source="scale.py")
    params = dict(config.model.params)
    out: dict[str, Any] = {"config": CONFIG.strip(), "sizes": {}}
    warm = synthetic_parquet(5_000, seed=1)
    mlpipe_path(warm, config)
    bare_path(warm, params, 4_000)
    for rows in sizes:
        data = synthetic_parquet(rows)
        train_rows = rows - int(np.ceil(rows * config.split.holdout_fraction))
        mlpipe_runs: list[dict[str, float]] = []
        no_impute_runs: list[dict[str, float]] = []
        bare_runs: list[dict[str, float]] = []
        loads = []
        for r in range(repeats):
            loads.append(load()[0])
            # Alternate who goes first, so none always gets the warmer caches.
            order = ("mlpipe", "bare", "no_impute")
            for who in order if r % 2 == 0 else reversed(order):
                if who == "mlpipe":
                    mlpipe_runs.append(mlpipe_path(data, config))
                elif who == "no_impute":
                    no_impute_runs.append(mlpipe_path(data, no_impute))
                else:
                    bare_runs.append(bare_path(data, params, train_rows))
        m50, m95 = p50_p95([m["total"] for m in mlpipe_runs])
        b50, b95 = p50_p95([b["total"] for b in bare_runs])
        n50, n95 = p50_p95([m["total"] for m in no_impute_runs])
        steps = {
            k: p50_p95([m[k] for m in mlpipe_runs])[0]
            for k in ("read", "check", "split", "select", "fit", "split_json_encode")
        }
        bare_steps = {k: p50_p95([b[k] for b in bare_runs])[0] for k in ("read", "fit")}
        out["sizes"][str(rows)] = {
            "rows": rows,
            "parquet_bytes": len(data),
            "mlpipe": {"p50": m50, "p95": m95, "steps": steps},
            "bare": {"p50": b50, "p95": b95, "steps": bare_steps},
            "ratio": m50 / b50,
            "no_impute": {"p50": n50, "p95": n95, "ratio": n50 / b50},
            "split_json_bytes": mlpipe_runs[0]["split_json_bytes"],
            "loads": loads,
        }
        progress(
            f"  scale {rows:>9,} rows: mlpipe {m50:.3f}s  bare {b50:.3f}s  "
            f"ratio {m50 / b50:.2f}x  (impute: none {n50:.3f}s, {n50 / b50:.2f}x)  "
            f"(load {min(loads)}..{max(loads)})"
        )
    first, last = str(sizes[0]), str(sizes[-1])
    out["growth"] = {
        "mlpipe": out["sizes"][last]["mlpipe"]["p50"] / out["sizes"][first]["mlpipe"]["p50"],
        "bare": out["sizes"][last]["bare"]["p50"] / out["sizes"][first]["bare"]["p50"],
        "rows": sizes[-1] / sizes[0],
    }
    return out


def print_scale(result: dict[str, Any]) -> None:
    print(
        f"\nscale: data path (read + check + split + fit), p50 seconds, "
        f"{result['threads']} thread(s)"
    )
    head = (
        f"  {'rows':>9}  {'mlpipe':>8}  {'bare':>8}  {'ratio':>6}  "
        f"{'read':>6} {'check':>6} {'split':>6} {'select':>6} {'fit':>7}  "
        f"{'bare read':>9} {'bare fit':>8}  {'no-impute':>9} {'ratio':>6}  load"
    )
    print(head)
    for s in result["sizes"].values():
        m, b = s["mlpipe"], s["bare"]
        st, bs = m["steps"], b["steps"]
        print(
            f"  {s['rows']:>9,}  {m['p50']:8.3f}  {b['p50']:8.3f}  {s['ratio']:5.2f}x  "
            f"{st['read']:6.3f} {st['check']:6.3f} {st['split']:6.3f} {st['select']:6.3f} "
            f"{st['fit']:7.3f}  {bs['read']:9.3f} {bs['fit']:8.3f}  "
            f"{s['no_impute']['p50']:9.3f} {s['no_impute']['ratio']:5.2f}x  "
            f"{min(s['loads'])}..{max(s['loads'])}"
        )
    g = result["growth"]
    print(f"  growth {g['rows']:.0f}x rows: mlpipe {g['mlpipe']:.1f}x time, bare {g['bare']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP/BLAS threads")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = run_scale(args.repeats, threads=args.threads)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print_scale(result)


if __name__ == "__main__":
    main()
