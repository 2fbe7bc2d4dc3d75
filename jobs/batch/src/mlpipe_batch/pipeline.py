"""Batch scoring as an Apache Beam pipeline.

    input files ─▶ splits (a CSV file; a Parquet row group) ─▶ reshuffle ─▶ chunks of rows
      ─▶ score (the model loaded once per worker, its sha256 checked) ─┬▶ predictions-*.avro
                                                                       ├▶ rejected/*.avro
                                                                       └▶ one report a bundle
      ─▶ finish (after every shard is final): the metrics JSON, last; then the event

Every element past the splits is a whole chunk of rows (a DataFrame of at most chunk_rows):
a chunk is checked, scored by one call to the model and written to its shard as one run of
records, and a bundle reports its shards and counts once, as one element (its shards' names,
its rows, scored and rejected, its first bad row): the finish step sums a handful of reports,
and no row of a Parquet input or of a glob crosses a shuffle (one CSV or Avro object's chunks
do, below). A Parquet row group is read a chunk at a time, so a worker's memory is bounded by
the chunk, not by the row group nor by the file.

Inputs are read and the metrics and failure records written through the project's Storage
(google-cloud-storage, which honours STORAGE_EMULATOR_HOST) inside DoFns. The Avro shards
are written by the scoring DoFn itself, one shard per bundle, through the same Storage: Beam's
WriteToAvro reaches the emulator for its writes (its GCS filesystem builds the same client
library) but finalizes by GCS batch requests (gcsio.copy_batch), which fake-gcs-server does
not answer ("Bad response: not multi-part"). Shards are named by a fresh id; the finish step,
which runs only once every bundle has committed, deletes any shard no committed bundle
reported (a retried bundle's), so the shards the metrics list are exactly those under the
prefix. Scoring and writing in one DoFn also keeps the records out of Beam's coders.

A Parquet file is split by row group, and many input files (a glob) by file: the splits are
spread across workers, each reading and scoring its own, so a worker holds a chunk at a time.
A single CSV file (or Avro object container file) is read by one worker as a stream (its rows
are counted, so a bad row is named by its line); its chunks are then spread across workers for
scoring, the expensive part, through the shuffle.

Bad rows (a value of the wrong type, a required value missing) follow the spec's policy:
`reject_batch` fails the batch naming the file and its first bad row; `write_rejected` writes
them to rejected/ beside the output with the reason per row. A feature column missing from a
file, an unreadable file or a model version that does not exist fail the batch. A failed
batch leaves a failure record (jobs/<batch_id>.failed.json) and no metrics: nothing of it is
published as complete.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import fastavro
import numpy as np
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from mlpipe.errors import PermanentError
from mlpipe.faults import fault_point
from mlpipe.messaging.batch_jobs import REJECT_BATCH, WRITE_REJECTED, JobSpec, record_failure
from mlpipe.ml.data import read_dataset_chunks
from mlpipe.ml.scoring import (
    REJECTED_SCHEMA,
    LoadedModel,
    check_rows,
    load_version,
    prediction_schema,
)
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, make_client, parse_gs_uri

log = logging.getLogger(__name__)

# The runner of local jobs (`--runner=DirectRunner` is run on it; see `run`).
FN_API_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
REJECTED = "rejected"
PREDICTIONS_NAME = "predictions"
# Rows per Avro shard at most (a bundle writes one shard of each kind, or more past this).
SHARD_ROWS = 1_000_000


def storage_for(spec: JobSpec) -> Storage:
    return Storage(make_client(spec.project), spec.bucket)


def fail(storage: Storage, spec: JobSpec, exc: PermanentError, **detail: Any) -> PermanentError:
    """Record `exc` as the job's failure (first wins) and give it back to raise."""
    record_failure(storage, spec, exc.reason, exc.message, **detail)
    return exc


def load_model(storage: Storage, spec: JobSpec) -> LoadedModel:
    """The spec's model version, its artifact's sha256 checked against the registry record."""
    try:
        return load_version(Registry(storage), spec.model, spec.version)
    except FileNotFoundError as exc:
        raise PermanentError("unknown_model_version", str(exc)) from exc
    except ValueError as exc:  # the artifact does not match the sha256 of its record
        raise PermanentError("artifact_mismatch", f"{spec.model} v{spec.version}: {exc}") from exc


def _format(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    return "avro" if path.endswith(".avro") else "csv"


def input_files(storage: Storage, spec: JobSpec) -> list[str]:
    """The input's objects (paths in the bucket): one object, or every match of a glob."""
    bucket, name = parse_gs_uri(spec.input_uri)
    if bucket != spec.bucket:
        raise PermanentError(
            "invalid_batch_request", f"{spec.input_uri} is not in bucket gs://{spec.bucket}"
        )
    if not any(c in name for c in "*?["):
        if not storage.exists(name):
            raise PermanentError("dataset_missing", f"{spec.input_uri} does not exist")
        return [name]
    prefix = name[: min(name.index(c) for c in "*?[" if c in name)]
    found = sorted(p for p in storage.list(prefix) if fnmatch.fnmatchcase(p, name))
    if not found:
        raise PermanentError("dataset_missing", f"no object matches {spec.input_uri}")
    return found


@dataclass(frozen=True)
class Split:
    """A part of one input file read by one worker: a whole CSV file or a Parquet row group."""

    path: str
    row_group: int = -1
    first_row: int = 0  # data rows before it in the file (counted from 0)


class PlanSplits(beam.DoFn):
    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    def setup(self) -> None:
        self.storage = storage_for(self.spec)

    def process(self, _: Any) -> Iterator[Split]:
        try:
            for path in input_files(self.storage, self.spec):
                if _format(path) != "parquet":
                    yield Split(path)
                    continue
                yield from self._row_groups(path)
        except PermanentError as exc:
            raise fail(self.storage, self.spec, exc) from None

    def _row_groups(self, path: str) -> Iterator[Split]:
        import pyarrow.parquet as pq

        source = self.storage.uri(path)
        try:
            with self.storage.bucket.blob(path).open("rb") as stream:
                meta = pq.ParquetFile(stream).metadata
        except (ValueError, OSError) as exc:
            raise PermanentError(
                "unreadable_dataset", f"{source} is not valid parquet: {exc}"
            ) from exc
        first = 0
        for group in range(meta.num_row_groups):
            yield Split(path, group, first)
            first += meta.row_group(group).num_rows


@dataclass
class Chunk:
    source: str  # gs://...
    first_row: int  # data rows before it in its file (counted from 0)
    frame: pd.DataFrame


class ReadChunks(beam.DoFn):
    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    def setup(self) -> None:
        self.storage = storage_for(self.spec)

    def process(self, split: Split) -> Iterator[Chunk]:
        source = self.storage.uri(split.path)
        rows = self.spec.chunk_rows
        try:
            with self.storage.bucket.blob(split.path).open("rb") as stream:
                if split.row_group >= 0:
                    frames: Iterable[pd.DataFrame] = self._row_group(stream, split, rows, source)
                elif _format(split.path) == "avro":
                    frames = self._avro(stream, rows, source)
                else:
                    frames = read_dataset_chunks(stream, _format(split.path), source, rows)
                first = split.first_row
                for frame in frames:
                    yield Chunk(source, first, frame)
                    first += len(frame)
        except PermanentError as exc:
            raise fail(self.storage, self.spec, exc, source=source) from None

    @staticmethod
    def _avro(stream: Any, rows: int, source: str) -> Iterator[pd.DataFrame]:
        """An Avro object container file's records, `rows` at a time (read as a stream)."""
        try:
            batch: list[dict[str, Any]] = []
            for record in fastavro.reader(stream):
                batch.append(record)  # type: ignore[arg-type]
                if len(batch) >= rows:
                    yield pd.DataFrame.from_records(batch)
                    batch = []
            if batch:
                yield pd.DataFrame.from_records(batch)
        except (ValueError, OSError, EOFError, StopIteration) as exc:
            raise PermanentError(
                "unreadable_dataset", f"{source} is not a valid Avro file: {exc}"
            ) from exc

    @staticmethod
    def _row_group(stream: Any, split: Split, rows: int, source: str) -> Iterator[pd.DataFrame]:
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(stream).iter_batches(
                batch_size=rows, row_groups=[split.row_group]
            )
            for batch in batches:
                yield batch.to_pandas()
        except (ValueError, OSError) as exc:
            raise PermanentError(
                "unreadable_dataset", f"{source} is not valid parquet: {exc}"
            ) from exc


class AvroShard:
    """Records written to a local spooled file, uploaded whole as one object when closed
    (GCS makes it visible at once)."""

    def __init__(self, storage: Storage, path: str, schema: dict[str, Any]) -> None:
        self.storage = storage
        self.path = path
        # Closed in close(): a shard outlives the call that opens it.
        self.file = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)  # noqa: SIM115
        self.writer = fastavro.write.Writer(self.file, fastavro.parse_schema(schema), "deflate")
        self.rows = 0

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.writer.write(record)
        self.rows += len(records)

    def close(self) -> str:
        self.writer.flush()
        self.file.seek(0)
        self.storage.bucket.blob(self.path).upload_from_file(
            self.file, content_type="application/avro"
        )
        self.file.close()
        return self.storage.uri(self.path)


class ScoreChunks(beam.DoFn):
    """Scores chunks with the spec's model version, loaded once per worker (setup), and writes
    each bundle's predictions (and rejected rows) as Avro shards under the output prefix.

    A shard is named by a fresh id, not by its place among all shards: a bundle that fails
    and is retried leaves a shard no committed bundle reports, which the finish step deletes.
    """

    def __init__(self, spec: JobSpec, schema: dict[str, Any], shard_rows: int) -> None:
        self.spec = spec
        self.schema = schema
        self.shard_rows = shard_rows

    def setup(self) -> None:
        self.storage = storage_for(self.spec)
        try:
            self.model = load_model(self.storage, self.spec)
        except PermanentError as exc:
            raise fail(self.storage, self.spec, exc) from None

    def start_bundle(self) -> None:
        self.shards: dict[str, AvroShard] = {}
        self.report = BundleReport()

    def _shard(self, kind: str) -> AvroShard:
        shard = self.shards.get(kind)
        if shard is not None and shard.rows >= self.shard_rows:
            self.report.add_shard(kind, shard.close())
            shard = None
        if shard is None:
            name = (
                f"{kind}/{kind}-{uuid.uuid4().hex}.avro"
                if kind == REJECTED
                else (f"{PREDICTIONS_NAME}-{uuid.uuid4().hex}.avro")
            )
            schema = REJECTED_SCHEMA if kind == REJECTED else self.schema
            shard = self.shards[kind] = AvroShard(
                self.storage, f"{self.spec.output_prefix}{name}", schema
            )
        return shard

    def process(self, chunk: Chunk) -> Iterator[Any]:
        model, spec = self.model, self.spec
        try:
            checked = check_rows(model, chunk.frame, spec.key_column, chunk.first_row, chunk.source)
        except PermanentError as exc:
            raise fail(self.storage, spec, exc, source=chunk.source) from None
        ok = checked.ok
        keys = checked.keys
        if ok.all():
            scored = model.predict_frame(checked.rows)
            good = keys
        else:
            scored = model.predict_frame(checked.rows[ok]) if ok.any() else []
            good = [keys[i] for i in np.flatnonzero(ok).tolist()]
        cast = float if model.task == "regression" else str
        name, version = model.name, model.version
        self._shard(PREDICTIONS_NAME).write(
            [
                {
                    "key": key,
                    "prediction": cast(value),
                    "error": None,
                    "model": name,
                    "model_version": version,
                }
                for key, value in zip(good, scored, strict=True)
            ]
        )
        bad = np.flatnonzero(~ok).tolist()
        if bad:
            problems = checked.problems
            if spec.bad_rows == WRITE_REJECTED:
                raw = checked.raw
                self._shard(REJECTED).write(
                    [
                        {
                            "key": keys[i],
                            "source": chunk.source,
                            "row": chunk.first_row + i + 1,
                            "reason": problems[i],
                            "values": json.dumps(raw.iloc[i].to_dict(), default=str),
                            "model": name,
                            "model_version": version,
                        }
                        for i in bad
                    ]
                )
            self.report.add_bad((chunk.source, chunk.first_row + bad[0] + 1, problems[bad[0]]))
        self.report.add_counts(len(keys), len(keys) - len(bad), len(bad))
        return iter(())

    def finish_bundle(self) -> Iterator[Any]:
        for kind, shard in self.shards.items():
            self.report.add_shard(kind, shard.close())
        yield WindowedValue(self.report, MIN_TIMESTAMP, (GlobalWindow(),))


@dataclass
class BundleReport:
    """What one committed bundle of scoring wrote: its shards, its rows (all, scored, bad),
    and its first bad row (file, row, reason), if any."""

    outputs: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    rows: int = 0
    scored: int = 0
    bad: int = 0
    first_bad: tuple[str, int, str] | None = None

    def add_shard(self, kind: str, uri: str) -> None:
        (self.rejected if kind == REJECTED else self.outputs).append(uri)

    def add_counts(self, rows: int, scored: int, bad: int) -> None:
        self.rows += rows
        self.scored += scored
        self.bad += bad

    def add_bad(self, first: tuple[str, int, str]) -> None:
        if self.first_bad is None or first[:2] < self.first_bad[:2]:
            self.first_bad = first

    @classmethod
    def total(cls, reports: Iterable[BundleReport]) -> BundleReport:
        out = cls()
        for report in reports:
            out.outputs += report.outputs
            out.rejected += report.rejected
            out.add_counts(report.rows, report.scored, report.bad)
            if report.first_bad is not None:
                out.add_bad(report.first_bad)
        return out


class Finish(beam.DoFn):
    """After every shard is final: reject the batch (its policy) or write the metrics, last,
    and publish BatchPredictionCompleted."""

    def __init__(self, spec: JobSpec, started: float, runner: str) -> None:
        self.spec = spec
        self.started = started
        self.runner = runner

    def process(self, _: Any, reports: list[BundleReport]) -> Iterator[dict[str, Any]]:
        spec = self.spec
        storage = storage_for(spec)
        total = BundleReport.total(reports)
        outputs, rejected, first_bad = total.outputs, total.rejected, total.first_bad
        rows, scored, bad = total.rows, total.scored, total.bad
        if first_bad is not None and spec.bad_rows == REJECT_BATCH:
            source, row, reason = first_bad
            message = (
                f"{source} row {row}: {reason} ({bad} bad row(s) of {rows}; "
                "the batch's policy is reject_batch)"
            )
            record_failure(storage, spec, "invalid_rows", message, source=source, row=row)
            remove_outputs(storage, spec)
            return
        # Shards of bundles that failed and were retried: no committed bundle reports them.
        kept = {storage.path_of(u) for u in [*outputs, *rejected]}
        for path in storage.list(spec.output_prefix):
            if path not in kept:
                storage.delete(path)
        duration = time.time() - self.started
        metrics = {
            "batch_id": spec.batch_id,
            "model": spec.model,
            "model_version": spec.version,
            "input_uri": spec.input_uri,
            "output_prefix": spec.uri(spec.output_prefix),
            "output_uris": sorted(outputs),
            "rejected_uris": sorted(rejected),
            "rows": rows,
            "scored_rows": scored,
            "rejected_rows": bad,
            "first_rejected_row": (
                {"source": first_bad[0], "row": first_bad[1], "reason": first_bad[2]}
                if first_bad
                else None
            ),
            "bad_rows": spec.bad_rows,
            "chunk_rows": spec.chunk_rows,
            "runner": self.runner,
            "duration_seconds": round(duration, 3),
            "rows_per_second": round(rows / duration, 1) if duration > 0 else None,
            "launched_at": spec.launched_at,
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "metrics_uri": spec.uri(spec.metrics_path),
        }
        fault_point("batch.before_metrics")
        storage.write_json(spec.metrics_path, metrics)
        yield metrics


def remove_outputs(storage: Storage, spec: JobSpec) -> int:
    """Delete everything under the batch's output prefix (a failed job's shards and Beam's
    temporary files); return how many objects went."""
    paths = storage.list(spec.output_prefix)
    for path in paths:
        storage.delete(path)
    return len(paths)


def build(
    pipeline: beam.Pipeline, spec: JobSpec, runner: str, shard_rows: int = SHARD_ROWS
) -> beam.PCollection:
    """The batch job's transforms on `pipeline`; the metrics (one dict, or none) come out."""
    started = time.time()
    schema = _schema_of(spec)
    chunks = (
        pipeline
        | "Start" >> beam.Create([None])
        | "PlanSplits" >> beam.ParDo(PlanSplits(spec))
        # Splits go to workers, each reading and scoring its own: its rows stay in its memory.
        | "SpreadSplits" >> beam.Reshuffle()
        | "ReadChunks" >> beam.ParDo(ReadChunks(spec))
    )
    if single_stream(spec.input_uri):
        # One stream, read by one worker: its chunks are spread for scoring instead, at the
        # cost of passing them through the shuffle (held in memory on the DirectRunner).
        chunks = chunks | "SpreadChunks" >> beam.Reshuffle()
    reports = chunks | "Score" >> beam.ParDo(ScoreChunks(spec, schema, shard_rows))
    return (
        pipeline
        | "AfterWrites" >> beam.Create([None])
        | "Finish" >> beam.ParDo(Finish(spec, started, runner), reports=beam.pvalue.AsList(reports))
    )


def single_stream(input_uri: str) -> bool:
    """One object read as one stream (CSV, Avro): not a glob, not Parquet (split by row group)."""
    return not any(c in input_uri for c in "*?[") and not input_uri.endswith(".parquet")


def _schema_of(spec: JobSpec) -> dict[str, Any]:
    """The output's record schema: the registry's task of the version (the job reads its
    record here, at construction, so the schema is fixed before any worker starts)."""
    storage = storage_for(spec)
    version = Registry(storage).get(spec.model, spec.version)
    if version is None:
        raise fail(
            storage,
            spec,
            PermanentError(
                "unknown_model_version",
                f"{spec.model} version {spec.version} is not in the registry",
            ),
        )
    return prediction_schema(str(version.info.get("task") or "classification"))


def run(spec: JobSpec, beam_args: list[str]) -> dict[str, Any] | None:
    """Run the job to its end here (DirectRunner) or until submitted (DataflowRunner, which
    returns at once); the metrics when it ran here and succeeded."""
    options = PipelineOptions(beam_args)
    runner = str(options.get_all_options().get("runner") or "DirectRunner")
    if runner == "DirectRunner":
        # Beam's DirectRunner first tries Prism, a runner it downloads from GitHub when the job
        # starts, and falls back to the FnApiRunner only when that fails. Local jobs run on the
        # FnApiRunner (with the same direct_* options), the runner tested and measured here,
        # whether or not this machine can reach GitHub.
        options.view_as(StandardOptions).runner = FN_API_RUNNER
    pipeline = beam.Pipeline(options=options)
    metrics = build(pipeline, spec, runner)
    if spec.publish:
        metrics | "Publish" >> beam.ParDo(PublishCompleted(spec))
    result = pipeline.run()
    if runner.endswith("DataflowRunner"):
        return None
    result.wait_until_finish()
    return storage_for(spec).read_json(spec.metrics_path)


class PublishCompleted(beam.DoFn):
    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    def process(self, metrics: dict[str, Any]) -> Iterator[None]:
        from mlpipe.messaging.batch_jobs import completed_event
        from mlpipe.messaging.publishing import Publisher

        event = completed_event(
            metrics,
            context=self.spec.context(),
            producer="batch-job",
            code_version=self.spec.code_version,
        )
        Publisher(self.spec.project).publish(event)
        return iter(())
