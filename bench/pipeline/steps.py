"""Inside the steps: the pieces of each service's work on one finished iris run, timed one by
one in this process against the chain's own emulators (chain.py calls this before it stops its
stack). Reads touch the run's real objects; writes go under bench-scratch/, never over the
run's artifacts; nothing is published to the pipeline's topics.

Each piece is called once (first: what a fresh process such as a training job pays, first
connections and first-call set-up included) and then `repeats` times (p50: the warm cost a
long-running service pays per message).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import joblib
from common import p50_p95

from mlpipe.messaging import events, topology
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import load_pipeline_config, load_run_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.modeling import build_pipeline, bundle_bytes, model_bundle
from mlpipe.ml.split import Split, split_rows
from mlpipe.ml.validation import check_dataset
from mlpipe.runtime.clients import Clients
from mlpipe.runtime.settings import CommonSettings
from mlpipe.store import layout
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.store.storage import Storage, make_client, sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ops.localstack import StackState


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(first call, p50 of the next `repeats`, the result) in seconds."""
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t0)
    return first, p50_p95(samples)[0], result


def _read(storage: Storage, uri: str) -> bytes:
    found = storage.read(storage.path_of(uri))
    assert found is not None, f"{uri} is missing"
    sha256_hex(found.data)  # every reader verifies the artifact's sha256 before unpickling
    return found.data


def profile_steps(state: StackState, run_id: str, model: str, repeats: int = 7) -> dict[str, Any]:
    """{piece: p50 seconds} for the pieces of each step (call inside client_env(state))."""
    from mlpipe.ml.scoring import load_version
    from mlpipe_deployer.deployment import holdout_frame
    from mlpipe_deployer.onnx_compile import compile_model, session
    from mlpipe_evaluator.evaluation import Champion, Evaluated, plot_data, score, scored
    from mlpipe_evaluator.report import render

    storage = Storage(make_client(state.project), state.bucket)
    registry = Registry(storage)
    paths = layout.RunPaths(run_id)
    out: dict[str, Any] = {}

    def put(label: str, fn: Callable[[], Any]) -> Any:
        first, seconds, result = _time(fn, repeats)
        out[label] = {"first": first, "p50": seconds}
        return result

    # Storage and Pub/Sub round trips: what every step pays per object and per event.
    put("gcs: read a small object (1 GET)", lambda: storage.read(paths.claim))
    put("gcs: read a missing object (404)", lambda: storage.read(paths.run_id + "/none"))
    put("gcs: exists() (1 metadata GET)", lambda: storage.exists(paths.claim))
    put("gcs: write a small object (1 upload)", lambda: storage.write("bench-scratch/x", b"{}"))
    put("gcs: storage.Client() construction", lambda: make_client(state.project))
    settings = CommonSettings(project=state.project, bucket=state.bucket)
    put(
        "job: Clients.create() (storage + PublisherClient)",
        lambda: Clients.create(settings, stage="training-job", receives_push=False),
    )
    # A fresh Publisher's first publish opens its gRPC channel: what each training job pays.
    topology.create_topics(state.project, ("bench-scratch",))
    scratch = events_pb2.DatasetLanded()
    put(
        "pubsub: new Publisher + its first publish (job)",
        lambda: Publisher(state.project).publish(scratch, topic="bench-scratch"),
    )
    warm = Publisher(state.project)
    put(
        "pubsub: publish on a warm Publisher (services)",
        lambda: warm.publish(scratch, topic="bench-scratch"),
    )

    # Trainer and training job.
    put("config: load_pipeline_config (GET + YAML)", lambda: load_pipeline_config(storage, "iris"))
    config = put("config: load_run_config (GET + JSON)", lambda: load_run_config(storage, run_id))
    recorded = storage.read(paths.training)
    assert recorded is not None, f"run {run_id} has no training.json"
    trained = events.from_json(events_pb2.TrainingCompleted, recorded.data)
    ref = trained.dataset
    data = put(
        "job: fetch dataset (GET + sha256)",
        lambda: storage.read(storage.path_of(ref.uri), generation=ref.generation or None),
    ).data
    frame = put("job: read_dataset (150-row CSV)", lambda: read_dataset(data, "csv", ref.uri))
    features = check_dataset(frame, config, ref.uri)
    split = put("job: split_rows", lambda: split_rows(frame, config))
    train_frame = frame.iloc[split.train]
    estimator = put(
        "job: build_pipeline + fit (RandomForest 100)",
        lambda: build_pipeline(config, features).fit(
            train_frame[features], train_frame[config.dataset.target]
        ),
    )
    bundle = model_bundle(estimator, config, features, run_id)
    model_bytes = put(
        "job: pickle the model bundle (as the job does)", lambda: bundle_bytes(bundle)
    )
    out["job: model bundle size (bytes)"] = {"first": len(model_bytes), "p50": len(model_bytes)}
    put(
        "job: write model.joblib (1 upload)",
        lambda: storage.write("bench-scratch/model.joblib", model_bytes),
    )

    # Evaluator.
    put(
        "evaluator: read model + sha256 + joblib.load",
        lambda: joblib.load(io.BytesIO(_read(storage, trained.model_uri))),
    )
    split_doc = storage.read_json(paths.split)
    holdout = frame.iloc[Split.from_json(split_doc).holdout]
    put(
        "evaluator: score (predict + predict_proba + metrics)",
        lambda: score(bundle, holdout, config),
    )

    def champion() -> Any:
        version = registry.alias(model, CHAMPION)
        mv = registry.get(model, version or 0)
        assert mv is not None
        return joblib.load(io.BytesIO(registry.load_artifact(mv)))

    put("evaluator: champion: alias + version.json + artifact + load", champion)
    _, details = score(bundle, holdout, config)
    evaluation = events_pb2.EvaluationCompleted()
    evaluation_obj = storage.read(paths.evaluation)
    if evaluation_obj is not None:
        evaluation = events.from_json(events_pb2.EvaluationCompleted, evaluation_obj.data)
    lineage_doc = storage.read_json(paths.lineage)
    put(
        "evaluator: report.render, no plots (HTML)",
        lambda: render(evaluation, details, lineage_doc),
    )
    kept = Evaluated(
        config, bundle, holdout, scored(bundle, holdout, config), Champion(None, 0, "")
    )
    # After the verdict is published: the numbers behind the plots, and the drawn report.
    put(
        "evaluator, after the verdict: plots.json's numbers",
        lambda: plot_data(storage, run_id, kept),
    )
    plots_doc = plot_data(storage, run_id, kept)
    put(
        "evaluator, after the verdict: report.render with matplotlib plots",
        lambda: render(evaluation, details, lineage_doc, plots_doc),
    )

    # Deployer.
    put(
        "deployer: holdout_frame (split GET + dataset GET + CSV)",
        lambda: holdout_frame(storage, evaluation),
    )
    compiled = put(
        "deployer: compile_model (skl2onnx + onnxruntime check)",
        lambda: compile_model(bundle, holdout),
    )
    if compiled.onnx:
        put("deployer:   of which an onnxruntime session", lambda: session(compiled.onnx))
    # Predictor.
    version = registry.alias(model, CHAMPION) or 0
    put(
        "predictor: load_version (reads + session + warm-up)",
        lambda: load_version(registry, model, version),
    )
    put("predictor: registry.traffic (2 GETs)", lambda: registry.traffic(model))
    storage.delete("bench-scratch/x")
    storage.delete("bench-scratch/model.joblib")
    return out
