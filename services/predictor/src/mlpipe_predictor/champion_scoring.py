"""A new champion scores the next days: the `scoring:` section of its pipeline's config.

The predictor's DeploymentCompleted step calls it after the reload. "Served" is true there:
the deployer publishes a deployment only once its target's rollout has finished
(mlpipe_deployer.progress), the predictor publishes one itself for a canary it promoted, and the
predictor has just reloaded what the registry says. Only a full champion scores: a deployment
that was not deployed, a canary, a rollback, or a version that is no longer the champion (a
late redelivery) starts nothing.

    the pipeline's registered config has `scoring:` (else nothing to do; the run's snapshot
      leaves scoring out, as it does not change what a run trains)
    → batch_id from the version and the first day scored (mlpipe.store.layout.scoring_batch_id)
    → its request is recorded, or its metrics exist: nothing (a redelivery, a second instance)
    → the rows (mlpipe.ml.scoring_rows, from the run's exact dataset bytes)
      written create-if-absent at predictions/<model>/inputs/<batch_id>.csv
    → publish one BatchPredictionRequest → record it at predictions/<model>/requests/<batch_id>.json

A crash between the publish and the record publishes the request again on the redelivery; the
batch step is idempotent per batch_id, so the same batch is scored once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from mlpipe.errors import PermanentError
from mlpipe.messaging import events
from mlpipe.messaging.publishing import Publisher
from mlpipe.ml.config import load_pipeline_config
from mlpipe.ml.data import read_dataset
from mlpipe.ml.scoring_rows import KEY_COLUMN, scoring_rows, scoring_start
from mlpipe.runtime.steps import StepResult
from mlpipe.store import layout
from mlpipe.store.registry import CHAMPION, Registry
from mlpipe.store.storage import Storage, sha256_hex
from mlpipe.v1 import events_pb2

log = logging.getLogger(__name__)


@dataclass
class ChampionScoring:
    storage: Storage
    publisher: Publisher
    registry: Registry
    code_version: str = "dev"
    env: str | None = None  # whose `environments:` overrides of the config apply

    def __call__(self, done: events_pb2.DeploymentCompleted) -> StepResult | None:
        """What the deployment started: None when it is not a champion's with `scoring:`;
        raises PermanentError when the rows cannot be made."""
        run_id = done.context.run_id
        if not (
            done.deployed
            and events.model_alias(done) == CHAMPION
            and events.rollout_action(done) == "promote"
            and done.version
            and layout.RUN_ID_PATTERN.match(run_id)
        ):
            return None
        try:
            config = load_pipeline_config(
                self.storage, done.context.pipeline or done.dataset.name, self.env
            )
        except PermanentError as exc:
            if exc.reason == "unknown_pipeline":  # a model deployed without a registered config
                return None
            raise
        if config.scoring is None:
            return None
        model = done.model_name
        champion = self.registry.alias(model, CHAMPION)
        if champion != done.version:
            return StepResult(
                "ignored",
                {"scoring": f"v{done.version} is no longer the champion (v{champion} is)"},
                run_id,
            )
        frame = self._dataset(done)
        start = scoring_start(frame, config, done.dataset.uri)
        batch_id = layout.scoring_batch_id(done.version, start)
        request_path = layout.scoring_request_path(model, batch_id)
        detail = {"batch_id": batch_id, "first_day": start.isoformat()}
        if self.storage.exists(request_path) or self.storage.exists(
            layout.batch_metrics_path(model, batch_id)
        ):
            return StepResult("ignored", {**detail, "scoring": "already requested"}, run_id)
        rows = scoring_rows(frame, config, done.dataset.uri, start)
        input_path = layout.scoring_input_path(model, batch_id)
        # The same run's bytes make the same rows: whichever delivery writes first stands.
        self.storage.create_if_absent(input_path, rows.to_csv(index=False).encode())
        request = events_pb2.BatchPredictionRequest(
            context=events.next_context(
                done.context, producer="predictor", code_version=self.code_version
            ),
            batch_id=batch_id,
            model_name=model,
            input_uri=self.storage.uri(input_path),
            version=done.version,
            key_column=KEY_COLUMN,
        )
        self.publisher.publish(request)
        self.storage.create_if_absent(request_path, events.to_json(request).encode())
        log.info(
            "champion %s v%d scores %d rows from %s (batch %s)",
            model,
            done.version,
            len(rows),
            start,
            batch_id,
        )
        return StepResult(
            "scoring_requested",
            {**detail, "rows": len(rows), "input_uri": request.input_uri},
            run_id,
        )

    def _dataset(self, done: events_pb2.DeploymentCompleted) -> pd.DataFrame:
        ref = done.dataset
        found = self.storage.read(self.storage.path_of(ref.uri), generation=ref.generation or None)
        if found is None or (ref.sha256 and sha256_hex(found.data) != ref.sha256):
            raise PermanentError(
                "dataset_missing",
                f"{ref.uri} (generation {ref.generation}) is missing or differs from its sha256; "
                "the champion's scoring has no rows to make",
            )
        return read_dataset(found.data, events.data_format(ref) or "csv", ref.uri)
