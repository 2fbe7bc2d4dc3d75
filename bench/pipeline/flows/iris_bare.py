"""The floor: the three steps as plain functions in one process, no orchestrator.

    python bench/pipeline/flows/iris_bare.py examples/iris/iris.csv

Prints one JSON line: the accuracy and how long the three steps took in process (after the
imports); the caller times the whole process from the outside as well.
"""

from __future__ import annotations

import json
import sys
import time

import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split

TARGET = "species"
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def load(path: str) -> pd.DataFrame:
    return pd.read_csv(path)


def split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A 20% stratified holdout, seeded as examples/iris/pipeline.yaml's split."""
    train, holdout = train_test_split(frame, test_size=0.2, random_state=42, stratify=frame[TARGET])
    return train, holdout


def train(frame: pd.DataFrame) -> RandomForestClassifier:
    rows, _ = split(frame)
    model = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    return model.fit(rows[FEATURES], rows[TARGET])


def evaluate(frame: pd.DataFrame, model: RandomForestClassifier) -> float:
    _, holdout = split(frame)
    return float(accuracy_score(holdout[TARGET], model.predict(holdout[FEATURES])))


def main(path: str) -> None:
    t0 = time.perf_counter()
    frame = load(path)
    model = train(frame)
    accuracy = evaluate(frame, model)
    print(json.dumps({"accuracy": accuracy, "in_process_seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main(sys.argv[1])
