"""Every path in the bucket, built here and nowhere else, and the run identity rules.

    datasets/<name>/dt=YYYY-MM-DD/<id>.<csv|parquet>       landed data (immutable)
    pipelines/<name>/config.yaml                            registered pipeline configs
    runs/<run_id>/...                                       a run's artifacts and recorded
                                                            events (RunPaths)
    quarantine/<reason>/<stage>-<key>                       rejected inputs, kept whole
    registry/<model>/...                                    versions, aliases, claims
                                                            (RegistryPaths)
    rollouts/<model>.json                                   a rollout still running on a
                                                            cloud target (its operations)
    monitoring/<model>/dt=YYYY-MM-DD/<time>-<id>.jsonl      the predictor's prediction log,
                                                            read by the drift check
    monitoring/<model>/reports/<check_id>/                  a drift check's report and event
    monitoring/<model>/retrains/, retrain/<check_id>.csv    drift retrains: slots and data
    predictions/<model>/dt=YYYY-MM-DD/<batch_id>.avro       batch predictions (in-process)
    predictions/<model>/dt=YYYY-MM-DD/<batch_id>/           batch predictions (a batch job):
        predictions-SSSSS-of-NNNNN.avro                     sharded Avro
        rejected/rejected-SSSSS-of-NNNNN.avro               rows it could not score, and why
    predictions/<model>/jobs/<batch_id>.json                the batch job started for it
                                                            (created once: one job per batch)
    predictions/<model>/jobs/<batch_id>.failed.json         why that job failed (first wins)
    predictions/<model>/jobs/<batch_id>.completed.json      the BatchPredictionCompleted the
                                                            predictor recorded (its skip record)
    predictions/<model>/metrics/<batch_id>.json             a batch's metrics, written last
    requests/<service>/<request_id>.json                    the first final answer to an
                                                            event sent over HTTP
    ingest/exports/<export_id>.json                         an export ingest started (its
                                                            jobs), and how it ended
    ingest/exports/<export_id>/...                          what the export wrote (staging)
    ingest/exports/<export_id>/validation.json              a large landing's validation job
                                                            started (created once)
    ingest/exports/<export_id>/verdict.json                 that job's verdict (first wins)
    audit/console/dt=YYYY-MM-DD/<time>-<id>.json            an action asked for in the
                                                            console: who, what, when, result
    reports/pending/<run_id>                                a run whose report is still
                                                            to be drawn (the evaluator's)
    notifications/<channel>/<key>.json                      one notice to one channel:
                                                            claimed, sent or rejected (the
                                                            notifier's idempotency record)
    approvals/<approval_id>.json                            a request to promote a model
                                                            version into this environment,
                                                            and its decision
    promotions/<model>/<version>-from-<env>.json            a promotion into this environment
                                                            (created once: one per version
                                                            and source)
    runs/<run_id>/promoted-from/...                         what a promoted run copied from
                                                            its source run

A path one service writes and another reads (a run's artifacts, the registry, the prediction
log, batch outputs) is a contract between them: both build it with the same function here.

A run is one (dataset content, pipeline config) pair: its id is derived from the dataset's
sha256 and the config's hash, so the same bytes under the same config always give the same
run, whoever delivers them and however often.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable

DATASETS = "datasets/"
PIPELINES = "pipelines/"
RUNS = "runs/"
QUARANTINE = "quarantine/"
REGISTRY = "registry/"
ROLLOUTS = "rollouts/"
MONITORING = "monitoring/"
PREDICTIONS = "predictions/"
EXPORTS = "ingest/exports/"
# One marker per training run whose job was started and whose result is not yet recorded: the
# trainer's reconciler lists only these (and drops the marker once the run is recorded).
OPEN_RUNS = "training/open/"
EXPORT_ID_PATTERN = re.compile(r"^[0-9a-f]{24}\Z")
# Events sent to a service over HTTP, by request id: the first final answer to each.
DIRECT_REQUESTS = "requests/"
# What was done (or refused) through the console, one record per action.
CONSOLE_AUDIT = "audit/console/"
# One marker per evaluated run whose report is not drawn yet: the evaluator draws these after
# answering the push, and on start draws any a stopped instance left.
PENDING_REPORTS = "reports/pending/"
# One record per notice and channel, created once (the notifier's claim), so a redelivered event
# posts nothing twice.
NOTIFICATIONS = "notifications/"

# Requests to promote a model into this environment, one record each (docs/promotion.md).
APPROVALS = "approvals/"
# One record per promotion carried out into this environment.
PROMOTIONS = "promotions/"

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{16}\Z")
APPROVAL_ID_PATTERN = re.compile(r"^[0-9a-f]{12}\Z")
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
# A notification channel's name and a notice's key: one segment of an object name each.
NOTIFICATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}\Z")
DATASET_PATH = re.compile(
    r"^datasets/(?P<name>[a-z][a-z0-9_-]{0,62})/dt=(?P<date>\d{4}-\d{2}-\d{2})/"
    r"(?P<id>[^/]+)\.(?P<ext>csv|parquet)\Z"
)
# How a dataset path looks, for messages.
DATASET_PATH_FORM = "datasets/<name>/dt=YYYY-MM-DD/<id>.csv|parquet"


def run_id_for(dataset_sha256: str, config_sha256: str) -> str:
    digest = hashlib.sha256(f"{dataset_sha256}:{config_sha256}".encode()).hexdigest()
    return digest[:16]


# --- datasets and pipelines ---------------------------------------------------------------
def dataset_prefix(name: str) -> str:
    return f"{DATASETS}{name}/"


def dataset_path(name: str, day: dt.date, dataset_id: str, ext: str) -> str:
    return f"{dataset_prefix(name)}dt={day.isoformat()}/{dataset_id}.{ext}"


def pipeline_config_path(pipeline: str) -> str:
    return f"{PIPELINES}{pipeline}/config.yaml"


# --- runs ---------------------------------------------------------------------------------
def run_prefix(run_id: str) -> str:
    return f"{RUNS}{run_id}/"


def run_ids(paths: Iterable[str]) -> list[str]:
    """The run ids in a listing of RUNS, sorted."""
    return sorted({p.split("/")[1] for p in paths if p.startswith(RUNS) and p.count("/") >= 2})


class RunPaths:
    """Where a run's artifacts live: `runs/<run_id>/...`."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        base = self.prefix = run_prefix(run_id)
        self.claim = base + "claim.json"
        self.config = base + "config.json"  # the config snapshot the run is keyed on
        self.started = base + "started.json"  # the TrainingStarted event
        self.model = base + "model.joblib"
        self.split = base + "split.json"
        self.lineage = base + "lineage.json"
        self.training = base + "training.json"  # the TrainingCompleted event, written last
        self.metrics = base + "metrics.json"
        self.plots = base + "plots.json"  # the numbers behind the report's plots
        self.report = base + "report.html"  # drawn from plots.json, written last
        self.evaluation = base + "evaluation.json"  # the EvaluationCompleted event
        self.deployment = base + "deployment.json"  # the DeploymentCompleted event
        self.failed = base + "failed.json"  # the PipelineFailed event of a failed run
        # The cost estimate of the ended run (mlpipe.store.run_cost.record_estimate), or why
        # there is none: written by the service that ends it.
        self.cost = base + "cost.json"
        self.job_log = base + "job.log"
        self.vertex_output = base + "vertex/"  # a Vertex AI CustomJob's output directory
        # A run promoted from another environment: the source run's records, copied as they
        # were (its split, dataset, lineage, evaluation and metrics).
        self.promoted_from = base + "promoted-from/"

    def file(self, name: str) -> str:
        """Another file of the run, e.g. an extra artifact (model.onnx) a promotion copied."""
        return self.prefix + name

    def promoted_source(self, name: str) -> str:
        """A file of the source run, copied by the promotion that made this run."""
        return self.promoted_from + name


def promoted_run_id(source_env: str, source_project: str, model: str, version: int) -> str:
    """The run a promotion of `model` v`version` from `source_env` makes in its target: the
    same id for every attempt, so a repeated promotion finds its run, and never the id of a run
    trained in the target (those come from run_id_for)."""
    key = f"promotion:{source_env}:{source_project}:{model}:{version}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def open_run_path(run_id: str) -> str:
    return f"{OPEN_RUNS}{run_id}"


def pending_report_path(run_id: str) -> str:
    return f"{PENDING_REPORTS}{run_id}"


def pending_report_runs(paths: Iterable[str]) -> list[str]:
    """The run ids in a listing of PENDING_REPORTS, sorted."""
    return sorted(
        p[len(PENDING_REPORTS) :]
        for p in paths
        if p.startswith(PENDING_REPORTS) and RUN_ID_PATTERN.match(p[len(PENDING_REPORTS) :])
    )


# --- quarantine ---------------------------------------------------------------------------
def direct_request_path(service: str, request_id: str) -> str:
    """requests/<service>/<request_id>.json: the recorded answer to a direct call."""
    if not REQUEST_ID_PATTERN.match(request_id) or request_id.strip(".") == "":
        raise ValueError(
            f"request_id {request_id!r} must be 1-128 letters, digits, '.', '_' or '-'"
        )
    return f"{DIRECT_REQUESTS}{service}/{request_id}.json"


def quarantine_path(reason: str, stage: str, key: str) -> str:
    """Where a rejected input is kept (the parts are made safe by the caller)."""
    return f"{QUARANTINE}{reason}/{stage}-{key}"


# --- the registry -------------------------------------------------------------------------
def registry_models(paths: Iterable[str]) -> list[str]:
    """The model names in a listing of REGISTRY, sorted."""
    return sorted({p.split("/")[1] for p in paths if p.startswith(REGISTRY) and p.count("/") >= 2})


class RegistryPaths:
    """One model's registry: `registry/<model>/...` (see mlpipe.store.registry)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.prefix = f"{REGISTRY}{model}/"
        self.versions = self.prefix + "versions/"
        self.aliases = self.prefix + "aliases/"
        self.version_claims = self.prefix + "version-claims/"
        # What each predictor instance serves, written by the instance (see instance()).
        self.instances = self.prefix + "instances/"

    def version(self, version: int) -> str:
        """The folder of a version's artifacts."""
        return f"{self.versions}{version}/"

    def version_file(self, version: int, name: str) -> str:
        return self.version(version) + name

    def version_record(self, version: int) -> str:
        """version.json, written last: the version is then complete."""
        return self.version_file(version, "version.json")

    @staticmethod
    def version_of_record(path: str) -> int | None:
        """The version number of a `.../versions/<n>/version.json` path, else None."""
        parts = path.split("/")
        if len(parts) == 5 and parts[4] == "version.json" and parts[3].isdigit():
            return int(parts[3])
        return None

    def alias(self, alias: str) -> str:
        return self.aliases + alias

    def run_claim(self, run_id: str) -> str:
        """The claim of a run's registration → the version registered for it."""
        return f"{self.prefix}runs/{run_id}.json"

    def version_claim(self, version: int) -> str:
        return f"{self.version_claims}{version}"

    def canary_counts(self, round_id: int) -> str:
        """The folder of one canary's outcome counts, one object per predictor instance; a
        canary is told apart by its alias's generation (`round_id`), so a version canaried
        again starts from zero."""
        return f"{self.prefix}canary-counts/{round_id}/"

    def canary_count(self, round_id: int, instance: str) -> str:
        return self.canary_counts(round_id) + instance

    def instance(self, instance: str) -> str:
        """One predictor instance's record of what it serves of this model, its registry
        watch and when it last said so (rewritten when that changes and as a heartbeat)."""
        return f"{self.instances}{instance}.json"

    def promotion(self, round_id: int) -> str:
        """Created once by the instance that promotes that canary (if_generation_match=0)."""
        return f"{self.prefix}promotions/{round_id}"


# --- rollouts ---------------------------------------------------------------------------
def rollout_path(model: str) -> str:
    """The record of `model`'s rollout while a cloud target's operations run."""
    return f"{ROLLOUTS}{model}.json"


def rollout_models(paths: Iterable[str]) -> list[str]:
    """The models in a listing of ROLLOUTS, sorted."""
    return sorted(
        p[len(ROLLOUTS) : -len(".json")]
        for p in paths
        if p.startswith(ROLLOUTS) and p.endswith(".json") and p.count("/") == 1
    )


# --- monitoring ---------------------------------------------------------------------------
def monitoring_prefix(model: str) -> str:
    return f"{MONITORING}{model}/"


def prediction_log_prefix(model: str, day: dt.date) -> str:
    """One day of the predictor's prediction log (the drift check lists it)."""
    return f"{monitoring_prefix(model)}dt={day.isoformat()}/"


def prediction_log_path(model: str, day: dt.date, name: str) -> str:
    """One file of the prediction log, as the predictor writes it."""
    return f"{prediction_log_prefix(model, day)}{name}.jsonl"


class DriftCheckPaths:
    """A drift check's outputs: `monitoring/<model>/reports/<check_id>/`."""

    def __init__(self, model: str, check_id: str) -> None:
        self.prefix = f"{monitoring_prefix(model)}reports/{check_id}/"
        self.report = self.prefix + "drift.json"  # written last: the check is done
        self.page = self.prefix + "drift.html"
        self.event = self.prefix + "drift-detected.json"  # the DriftDetected event


def retrain_cooldown_slot(model: str, period: int) -> str:
    return f"{monitoring_prefix(model)}retrains/cooldown-{period}"


def retrain_window_slot(model: str, window: int, slot: int) -> str:
    return f"{monitoring_prefix(model)}retrains/window-{window}-{slot}"


def retrain_data_path(model: str, check_id: str) -> str:
    """The rows a drift retrain lands (ingest reads them as a `gcs` source)."""
    return f"{monitoring_prefix(model)}retrain/{check_id}.csv"


# --- batch predictions --------------------------------------------------------------------
def batch_output_path(model: str, day: dt.date, batch_id: str) -> str:
    return f"{PREDICTIONS}{model}/dt={day.isoformat()}/{batch_id}.avro"


def batch_metrics_path(model: str, batch_id: str) -> str:
    """Written after the output: the batch is done."""
    return f"{PREDICTIONS}{model}/metrics/{batch_id}.json"


def batch_job_output_prefix(model: str, day: dt.date, batch_id: str) -> str:
    """A batch job's outputs (shards, rejected/), complete only once its metrics exist."""
    return f"{PREDICTIONS}{model}/dt={day.isoformat()}/{batch_id}/"


def batch_job_path(model: str, batch_id: str) -> str:
    """The record of the one job started for a batch (create-if-absent)."""
    return f"{PREDICTIONS}{model}/jobs/{batch_id}.json"


def batch_job_failure_path(model: str, batch_id: str) -> str:
    """Why a batch's job failed, written by the part of the job that failed first."""
    return f"{PREDICTIONS}{model}/jobs/{batch_id}.failed.json"


def batch_cost_path(model: str, batch_id: str) -> str:
    """The cost estimate of a finished batch (mlpipe.store.run_cost.record_batch_estimate)."""
    return f"{PREDICTIONS}{model}/jobs/{batch_id}.cost.json"


def batch_completed_path(model: str, batch_id: str) -> str:
    """The BatchPredictionCompleted recorded once the metrics exist (the step's skip record)."""
    return f"{PREDICTIONS}{model}/jobs/{batch_id}.completed.json"


def scoring_input_path(model: str, batch_id: str) -> str:
    """The rows a new champion scores for the next days (mlpipe.ml.scoring_rows), written
    before its BatchPredictionRequest is published."""
    return f"{PREDICTIONS}{model}/inputs/{batch_id}.csv"


def scoring_request_path(model: str, batch_id: str) -> str:
    """The BatchPredictionRequest published for a champion's scoring (create-if-absent after
    publishing: a redelivery that finds it publishes nothing)."""
    return f"{PREDICTIONS}{model}/requests/{batch_id}.json"


def scoring_batch_id(version: int, start: dt.date) -> str:
    """The batch of a champion's scoring: one per model version and first day scored."""
    return f"scoring-v{version}-{start:%Y%m%d}"


# --- ingest's exports ---------------------------------------------------------------------
def export_id_for(request_id: str, dataset: str) -> str:
    """The export of one request: the same id for every delivery of it, so a redelivery finds
    the export it started."""
    return hashlib.sha256(f"export:{request_id}:{dataset}".encode()).hexdigest()[:24]


def export_record_path(export_id: str) -> str:
    """The record of a long-running export ingest started (BigQuery, Earth Engine)."""
    return f"{EXPORTS}{export_id}.json"


def export_staging_prefix(export_id: str) -> str:
    """Where the cloud service writes the export's files (never read as a dataset)."""
    return f"{EXPORTS}{export_id}/"


def validation_job_path(export_id: str) -> str:
    """The validation job a large landing started (created once: one job per landing)."""
    return f"{export_staging_prefix(export_id)}validation.json"


def validation_verdict_path(export_id: str) -> str:
    """A large landing's validation verdict, written by its job (mlpipe_batch.validate)."""
    return f"{export_staging_prefix(export_id)}verdict.json"


def export_ids(paths: Iterable[str]) -> list[str]:
    """The export ids in a listing of EXPORTS (records only, not staged files), sorted."""
    ids = []
    for path in paths:
        name = path[len(EXPORTS) :] if path.startswith(EXPORTS) else ""
        if name.endswith(".json") and "/" not in name and EXPORT_ID_PATTERN.match(name[:-5]):
            ids.append(name[:-5])
    return sorted(ids)


# --- notifications ------------------------------------------------------------------------
def notification_path(channel: str, key: str) -> str:
    """The record of the notice `key` to `channel`: claimed, sent or rejected. Both parts come
    from configuration and events: ValueError unless each is one safe name segment."""
    for value, what in ((channel, "channel name"), (key, "notice key")):
        if not NOTIFICATION_NAME.match(value) or ".." in value:
            raise ValueError(
                f"{what} {value!r} cannot name an object: use 1-128 letters, digits, '_', '.', "
                "'=' or '-', starting with a letter or digit, without '..'"
            )
    return f"{NOTIFICATIONS}{channel}/{key}.json"


# --- console actions ----------------------------------------------------------------------
def console_action_path(when: dt.datetime, action_id: str) -> str:
    """One console action's record (promote, rollback, replay; allowed or refused): sorted by
    time within its day."""
    utc = when.astimezone(dt.UTC)
    return f"{CONSOLE_AUDIT}dt={utc.date().isoformat()}/{utc:%H%M%S.%f}-{action_id}.json"


# --- promotions and their approvals -------------------------------------------------------
def approval_path(approval_id: str) -> str:
    """approvals/<approval_id>.json: one request to promote a model into this environment."""
    if not APPROVAL_ID_PATTERN.match(approval_id):
        raise ValueError(f"{approval_id!r} is not an approval id (12 hex digits)")
    return f"{APPROVALS}{approval_id}.json"


def approval_ids(paths: Iterable[str]) -> list[str]:
    """The approval ids in a listing of APPROVALS, sorted."""
    ids = []
    for path in paths:
        name = path[len(APPROVALS) :] if path.startswith(APPROVALS) else ""
        if name.endswith(".json") and APPROVAL_ID_PATTERN.match(name[:-5]):
            ids.append(name[:-5])
    return sorted(ids)


def promotion_path(model: str, version: int, source_env: str) -> str:
    """The record of promoting `model` v`version` from `source_env` into this environment."""
    return f"{PROMOTIONS}{model}/{version}-from-{source_env}.json"
