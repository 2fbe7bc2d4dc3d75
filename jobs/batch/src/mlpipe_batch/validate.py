"""A large landing's validation as an Apache Beam pipeline: the pipeline's `dataset:` contract
checked on an object too large to read into ingest.

    the object ─▶ parts of rows (read as one stream, hashed as read; the header checked)
      ─▶ reshuffle ─▶ check each part (mlpipe.ml.validation.check_chunk) ─┐
      ─▶ (with `key:`) key → rows, grouped: repeated keys ────────────────┤
      ─▶ the verdict: rows, the features with values, the sha256, and the first bad row
         (the lowest data row of any part's problem); row count and empty features checked
         on the whole; written once to ingest/exports/<export_id>/verdict.json

The checks are validation.py's own, applied part by part (`check_header`, `check_chunk`,
`check_features_present`, `check_row_count`): a dataset that passes here passes
`check_dataset`, and one that fails names the same reason. A CSV is read by the one CSV reader
(mlpipe.ml.data.read_csv_text_chunks, every cell as text, as ingest reads it); a Parquet file by
record batches, its values as text. The object is read pinned to the generation ingest saw.
Ingest lands the object itself from the verdict (a server-side copy), never this job.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import apache_beam as beam
import pandas as pd
from apache_beam import pvalue
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from mlpipe.errors import PermanentError
from mlpipe.messaging.validation_jobs import ValidationSpec, record_verdict
from mlpipe.ml.config import PipelineConfig, load_pipeline_config
from mlpipe.ml.data import read_csv_text_chunks
from mlpipe.ml.validation import (
    BadRow,
    check_chunk,
    check_features_present,
    check_header,
    check_row_count,
)
from mlpipe.store.storage import Storage, make_client, parse_gs_uri

log = logging.getLogger(__name__)

# The runner of local jobs, as batch scoring's (mlpipe_batch.pipeline.run says why).
FN_API_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
SUMMARY, KEYS = "summary", "keys"


def storage_for(spec: ValidationSpec) -> Storage:
    return Storage(make_client(spec.project), spec.bucket)


class _Hashed(io.RawIOBase):
    """A binary stream that hashes what is read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.digest.update(data)
        self.size += n
        return n


def _problem(exc: PermanentError, row: int = 0) -> dict[str, Any]:
    return {
        "kind": "problem",
        "reason": exc.reason,
        "message": exc.message,
        "row": getattr(exc, "row", row),
    }


class ReadParts(beam.DoFn):
    """The object as parts of rows (first data row, header, rows), its header checked; a
    summary (sha256, size, columns, features) on SUMMARY; a problem reading it, as a problem."""

    def __init__(self, spec: ValidationSpec) -> None:
        self.spec = spec

    def setup(self) -> None:
        self.storage = storage_for(self.spec)
        self.config = load_pipeline_config(self.storage, self.spec.dataset, self.spec.env)

    def process(self, uri: str) -> Iterator[Any]:
        bucket, name = parse_gs_uri(uri)
        blob = self.storage.client.bucket(bucket).blob(name, generation=self.spec.generation)
        first = 1
        columns: list[str] = []
        try:
            with blob.open("rb", chunk_size=8 * 1024 * 1024) as raw:
                hashed = _Hashed(raw)
                stream = io.BufferedReader(hashed, buffer_size=1024 * 1024)
                for header, rows in self._parts(stream, uri):
                    if not columns:
                        columns = header
                        features = check_header(columns, self.config, uri)
                    yield first, header, rows
                    first += len(rows)
                if self.spec.format == "parquet":
                    stream.read()  # the rest of the file, for its sha256
        except PermanentError as exc:
            yield pvalue.TaggedOutput(SUMMARY, _problem(exc, 0))
            return
        yield pvalue.TaggedOutput(
            SUMMARY,
            {
                "kind": "read",
                "sha256": hashed.digest.hexdigest(),
                "size": hashed.size,
                "columns": columns,
                "features": features,
            },
        )

    def _parts(self, stream: BinaryIO, uri: str) -> Iterable[tuple[list[str], list[list[str]]]]:
        if self.spec.format != "parquet":
            return read_csv_text_chunks(stream, uri, self.spec.chunk_rows)
        return _parquet_parts(stream, uri, self.spec.chunk_rows)


def _parquet_parts(
    stream: BinaryIO, uri: str, rows: int
) -> Iterator[tuple[list[str], list[list[str]]]]:
    """A Parquet file's record batches as text rows (as ingest reads a Parquet source). It is
    read whole into a buffer first: Parquet's footer comes last, so it is not a stream."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = io.BytesIO(stream.read())
    try:
        file = pq.ParquetFile(data)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PermanentError("unreadable_dataset", f"{uri} is not valid Parquet: {exc}") from exc
    if file.metadata.num_rows == 0:
        raise PermanentError("header_only", f"{uri} has columns but no rows")
    header = [str(c) for c in file.schema_arrow.names]
    for batch in file.iter_batches(batch_size=rows):
        columns = []
        for column in batch.columns:
            text = pc.cast(column, pa.string()) if column.type != pa.string() else column
            columns.append(["" if v is None else v for v in text.to_pylist()])
        yield header, [list(r) for r in zip(*columns, strict=True)]


class CheckPart(beam.DoFn):
    """One part checked (check_chunk): its rows and features with values, or its first bad
    row; each row's key on KEYS when the pipeline has a `key:`."""

    def __init__(self, spec: ValidationSpec) -> None:
        self.spec = spec

    def setup(self) -> None:
        self.config: PipelineConfig = load_pipeline_config(
            storage_for(self.spec), self.spec.dataset, self.spec.env
        )

    def process(self, part: tuple[int, list[str], list[list[str]]]) -> Iterator[Any]:
        first, header, rows = part
        frame = pd.DataFrame(rows, columns=header, dtype=str)
        features = self.config.feature_columns(header)
        try:
            present = check_chunk(frame, self.config, features, self.spec.input_uri, first)
        except BadRow as exc:
            yield _problem(exc)
            return
        yield {"kind": "part", "rows": len(rows), "present": sorted(present)}
        key = self.config.dataset.key
        if key:
            index = [header.index(c) for c in key]
            for n, row in enumerate(rows):
                yield pvalue.TaggedOutput(KEYS, (tuple(row[i] for i in index), first + n))


def repeated_key(item: tuple[tuple[str, ...], Iterable[int]], uri: str, key: list[str]) -> Any:
    """A problem for a key found on more than one row: its second row."""
    value, rows = item
    found = sorted(rows)
    if len(found) > 1:
        yield {
            "kind": "problem",
            "reason": "duplicate_key",
            "message": f"{uri}: key {dict(zip(key, value, strict=True))} repeats on data rows "
            f"{found[:10]}",
            "row": found[1],
        }


class Verdict(beam.CombineFn):
    """Every part's outcome in one: rows, features with values, the read summary and the
    problem of the lowest row (a problem that is no row's, row 0, comes first)."""

    def create_accumulator(self) -> dict[str, Any]:
        return {"rows": 0, "present": [], "read": None, "problem": None}

    def add_input(self, acc: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
        if value["kind"] == "part":
            acc["rows"] += value["rows"]
            acc["present"] = sorted({*acc["present"], *value["present"]})
        elif value["kind"] == "read":
            acc["read"] = value
        else:
            current = acc["problem"]
            if current is None or value["row"] < current["row"]:
                acc["problem"] = value
        return acc

    def merge_accumulators(self, accs: Iterable[dict[str, Any]]) -> dict[str, Any]:
        merged = self.create_accumulator()
        for acc in accs:
            merged["rows"] += acc["rows"]
            merged["present"] = sorted({*merged["present"], *acc["present"]})
            merged["read"] = merged["read"] or acc["read"]
            if acc["problem"] is not None:
                self.add_input(merged, acc["problem"])
        return merged

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        return acc


class WriteVerdict(beam.DoFn):
    """The checks of the whole (row count, every feature has a value), then the verdict."""

    def __init__(self, spec: ValidationSpec) -> None:
        self.spec = spec

    def process(self, acc: dict[str, Any]) -> Iterator[None]:
        storage = storage_for(self.spec)
        config = load_pipeline_config(storage, self.spec.dataset, self.spec.env)
        uri = self.spec.input_uri
        problem, read = acc["problem"], acc["read"]
        if problem is None and read is not None:
            try:
                check_row_count(acc["rows"], config, uri)
                check_features_present(read["features"], set(acc["present"]), uri)
            except PermanentError as exc:
                problem = _problem(exc, 0)
        if problem is None and read is None:
            problem = {"reason": "unreadable_dataset", "message": f"{uri} was not read", "row": 0}
        if problem is not None:
            verdict = record_verdict(
                storage,
                self.spec,
                valid=False,
                reason=problem["reason"],
                message=problem["message"],
                row=problem["row"],
            )
        else:
            verdict = record_verdict(
                storage,
                self.spec,
                valid=True,
                rows=acc["rows"],
                columns=read["columns"],
                sha256=read["sha256"],
                size=read["size"],
            )
        log.info("validation of %s: %s", uri, verdict)
        return iter(())


def build(pipeline: beam.Pipeline, spec: ValidationSpec, key: list[str]) -> None:
    read = (
        pipeline
        | "Object" >> beam.Create([spec.input_uri])
        | "Read" >> beam.ParDo(ReadParts(spec)).with_outputs(SUMMARY, main="parts")
    )
    checked = (
        read.parts
        | "Spread" >> beam.Reshuffle()
        | "Check" >> beam.ParDo(CheckPart(spec)).with_outputs(KEYS, main="outcomes")
    )
    outcomes = [read[SUMMARY], checked.outcomes]
    if key:
        outcomes.append(
            checked[KEYS]
            | "ByKey" >> beam.GroupByKey()
            | "Repeated" >> beam.FlatMap(repeated_key, spec.input_uri, key)
        )
    (
        outcomes
        | "All" >> beam.Flatten()
        | "Verdict" >> beam.CombineGlobally(Verdict())
        | "Write" >> beam.ParDo(WriteVerdict(spec))
    )


def run(spec: ValidationSpec, beam_args: list[str]) -> dict[str, Any] | None:
    """Run the validation to its end here (DirectRunner) or until submitted (DataflowRunner);
    the verdict when it ran here."""
    options = PipelineOptions(beam_args)
    runner = str(options.get_all_options().get("runner") or "DirectRunner")
    if runner == "DirectRunner":
        options.view_as(StandardOptions).runner = FN_API_RUNNER
    storage = storage_for(spec)
    try:
        config = load_pipeline_config(storage, spec.dataset, spec.env)
    except PermanentError as exc:
        return record_verdict(
            storage, spec, valid=False, reason=exc.reason, message=exc.message, row=0
        )
    pipeline = beam.Pipeline(options=options)
    build(pipeline, spec, list(config.dataset.key))
    result = pipeline.run()
    if runner.endswith("DataflowRunner"):
        return None
    result.wait_until_finish()
    found: dict[str, Any] | None = storage.read_json(spec.verdict_path)
    return found
