"""The three steps as a KFP v2 pipeline run locally: three lightweight components passing
artifacts (Dataset → Model → Metrics), each task a subprocess (kfp.local.SubprocessRunner).

    python iris_kfp.py --csv PATH --root /tmp/...

Run by peers.py in bench/.venvs/kfp. The most favourable local set-up for KFP: tasks run in that
venv (use_venv=False) and components skip the per-task `pip install kfp` (install_kfp_package=
False), which the venv already has; with the defaults every task would first build a venv.
"""

# No `from __future__ import annotations`: KFP reads the annotations as types.

import argparse
import json

from kfp import dsl, local
from kfp.dsl import Dataset, Input, Metrics, Model, Output


@dsl.component(install_kfp_package=False)
def load_data(csv_path: str, data: Output[Dataset]):
    import pandas as pd

    pd.read_csv(csv_path).to_csv(data.path, index=False)


@dsl.component(install_kfp_package=False)
def train_model(data: Input[Dataset], model: Output[Model]):
    import joblib
    import pandas as pd
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    frame = pd.read_csv(data.path)
    features = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    rows, _ = train_test_split(frame, test_size=0.2, random_state=42, stratify=frame["species"])
    fitted = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    fitted.fit(rows[features], rows["species"])
    joblib.dump(fitted, model.path)


@dsl.component(install_kfp_package=False)
def evaluate_model(data: Input[Dataset], model: Input[Model], metrics: Output[Metrics]):
    import joblib
    import pandas as pd
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split

    frame = pd.read_csv(data.path)
    features = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    _, holdout = train_test_split(frame, test_size=0.2, random_state=42, stratify=frame["species"])
    fitted = joblib.load(model.path)
    metrics.log_metric(
        "accuracy", float(accuracy_score(holdout["species"], fitted.predict(holdout[features])))
    )


@dsl.pipeline(name="iris")
def iris_pipeline(csv_path: str):
    data = load_data(csv_path=csv_path)
    model = train_model(data=data.outputs["data"])
    evaluate_model(data=data.outputs["data"], model=model.outputs["model"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--csv", required=True)
    parser.add_argument("--root", required=True, help="local pipeline root")
    args = parser.parse_args()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=args.root)
    run = iris_pipeline(csv_path=args.csv)
    print(json.dumps({"state": str(getattr(run, "state", "done"))}))
