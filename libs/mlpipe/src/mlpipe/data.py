"""Reading a landed dataset and splitting it deterministically (shared by trainer and evaluator)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from mlpipe.config import PipelineConfig
from mlpipe.errors import PermanentError


def read_dataset(data: bytes, fmt: str, source: str) -> pd.DataFrame:
    """Parse landed bytes; a file that cannot be read is a permanent error naming it."""
    if not data.strip():
        raise PermanentError("empty_dataset", f"{source} is empty")
    try:
        if fmt == "parquet":
            return pd.read_parquet(io.BytesIO(data))
        return pd.read_csv(io.BytesIO(data))
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise PermanentError("unreadable_dataset", f"{source} is not valid {fmt}: {exc}") from exc


def check_columns(frame: pd.DataFrame, config: PipelineConfig, source: str) -> list[str]:
    """Return the feature columns; raise if the target or a feature column is missing."""
    columns = [str(c) for c in frame.columns]
    target = config.dataset.target
    features = config.feature_columns(columns)
    missing = [c for c in [target, *features] if c not in columns]
    if missing:
        raise PermanentError(
            "missing_column",
            f"{source} lacks column(s) {missing} required by pipeline {config.name!r} "
            f"(found: {columns})",
        )
    if not features:
        raise PermanentError("no_features", f"{source} has no feature columns besides {target!r}")
    rows = len(frame)
    if rows < config.dataset.min_rows or rows > config.dataset.max_rows:
        raise PermanentError(
            "row_count",
            f"{source} has {rows} rows; pipeline {config.name!r} accepts "
            f"{config.dataset.min_rows}..{config.dataset.max_rows}",
        )
    if frame[target].isna().any():
        raise PermanentError(
            "null_target", f"{source} has {int(frame[target].isna().sum())} rows without {target!r}"
        )
    return features


@dataclass(frozen=True)
class Split:
    train: list[int]
    holdout: list[int]
    seed: int
    stratified: bool

    def to_json(self) -> dict[str, object]:
        return {
            "train": self.train,
            "holdout": self.holdout,
            "seed": self.seed,
            "stratified": self.stratified,
        }

    @classmethod
    def from_json(cls, value: dict) -> Split:
        return cls(
            list(value["train"]),
            list(value["holdout"]),
            int(value["seed"]),
            bool(value["stratified"]),
        )


def split_rows(frame: pd.DataFrame, config: PipelineConfig) -> Split:
    """A seeded train/holdout split by row position; stratified for classification."""
    positions = np.arange(len(frame))
    y = frame[config.dataset.target]
    stratify = None
    if config.model.task == "classification" and config.split.stratify:
        counts = y.value_counts()
        holdout_n = int(np.ceil(len(frame) * config.split.holdout_fraction))
        # Stratifying needs two rows per class and a holdout with room for every class.
        if counts.min() >= 2 and holdout_n >= len(counts):
            stratify = y.to_numpy()
    train, holdout = train_test_split(
        positions,
        test_size=config.split.holdout_fraction,
        random_state=config.split.seed,
        stratify=stratify,
    )
    return Split(
        sorted(int(i) for i in train),
        sorted(int(i) for i in holdout),
        config.split.seed,
        stratify is not None,
    )
