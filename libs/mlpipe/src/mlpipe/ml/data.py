"""Reading datasets.

The one reader of dataset bytes, for every service: ingest reads each source's CSV with
`read_csv_text` (cells as text), the trainer, the evaluator and the deployer read landed or
uploaded files with `read_dataset` (typed values), and batch scoring reads its input in chunks
with `read_dataset_chunks`. CSV text is held to one set of rules with one set of failure
reasons: `empty_dataset`, `not_utf8`, `malformed_csv` (a row whose field count differs from
the header's, an empty or repeated header, an unreadable line), `header_only`; bytes that are
not Parquet are `unreadable_dataset`. Whether the rows fit a pipeline is checked by
mlpipe.ml.validation.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import pandas as pd

from mlpipe.errors import PermanentError

# A CSV's text encoding; a byte-order mark is skipped.
ENCODING = "utf-8-sig"


def _empty(data: bytes | str) -> bool:
    return not data or data.isspace()


def decode_text(data: bytes, source: str) -> str:
    try:
        return data.decode(ENCODING)
    except UnicodeDecodeError as exc:
        raise PermanentError("not_utf8", f"{source} is not UTF-8 text: {exc}") from exc


def _csv_rows(lines: Iterable[str], source: str) -> Iterator[list[str]]:
    """The header, then every data row, cells stripped and blank lines skipped: the one reading
    of CSV text. Raises `malformed_csv` or `header_only` naming the source and the line."""
    reader = csv.reader(lines)
    rows = 0
    try:
        header = [h.strip() for h in next(reader, [])]
        if not any(header):
            raise PermanentError("malformed_csv", f"{source} has an empty header line")
        if len(set(header)) != len(header):
            raise PermanentError("malformed_csv", f"{source} header repeats a column: {header}")
        yield header
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise PermanentError(
                    "malformed_csv",
                    f"{source} line {reader.line_num} has {len(row)} fields; "
                    f"the header has {len(header)}",
                )
            rows += 1
            yield [c.strip() for c in row]
    except csv.Error as exc:
        raise PermanentError(
            "malformed_csv", f"{source} line {reader.line_num} is unreadable: {exc}"
        ) from exc
    if not rows:
        raise PermanentError("header_only", f"{source} has a header but no rows")


def read_csv_text(text: str, source: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of CSV text, every cell as text."""
    if _empty(text):
        raise PermanentError("empty_dataset", f"{source} is empty")
    rows = _csv_rows(io.StringIO(text), source)
    header = next(rows)
    return header, list(rows)


def read_csv_text_chunks(
    stream: BinaryIO, source: str, rows: int
) -> Iterator[tuple[list[str], list[list[str]]]]:
    """CSV bytes read from a stream by the rules of `read_csv_text` (every cell as text), in
    parts of at most `rows` rows: (the header, the part's rows), one part at a time. A
    dataset too large to hold is checked so (mlpipe_batch.validate)."""
    lines = io.TextIOWrapper(stream, encoding=ENCODING, newline="")
    try:
        parsed = _csv_rows(lines, source)
        header = next(parsed)
        part: list[list[str]] = []
        for row in parsed:
            part.append(row)
            if len(part) >= rows:
                yield header, part
                part = []
        if part:
            yield header, part
    except UnicodeDecodeError as exc:
        raise PermanentError("not_utf8", f"{source} is not UTF-8 text: {exc}") from exc
    except StopIteration:
        raise PermanentError("empty_dataset", f"{source} is empty") from None


def _csv_header(data: bytes, source: str) -> list[str]:
    """Check CSV bytes against the rules of `read_csv_text` without holding them as text;
    return the header."""
    lines = io.TextIOWrapper(io.BytesIO(data), encoding=ENCODING, newline="")
    rows = _csv_rows(lines, source)
    try:
        header = next(rows)
        for _ in rows:
            pass
    except UnicodeDecodeError as exc:
        raise PermanentError("not_utf8", f"{source} is not UTF-8 text: {exc}") from exc
    return header


def read_dataset(data: bytes, fmt: str, source: str) -> pd.DataFrame:
    """Dataset bytes (CSV or Parquet) as a frame of typed values; a file that cannot be read is
    a permanent error naming it."""
    if _empty(data):
        raise PermanentError("empty_dataset", f"{source} is empty")
    if fmt == "parquet":
        try:
            return pd.read_parquet(io.BytesIO(data))
        except (ValueError, OSError) as exc:
            raise PermanentError(
                "unreadable_dataset", f"{source} is not valid parquet: {exc}"
            ) from exc
    header = _csv_header(data, source)
    try:
        frame = pd.read_csv(io.BytesIO(data), encoding=ENCODING)
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        raise PermanentError("malformed_csv", f"{source} is not valid csv: {exc}") from exc
    frame.columns = pd.Index(header)
    return frame


def read_dataset_chunks(
    stream: BinaryIO, fmt: str, source: str, rows: int
) -> Iterator[pd.DataFrame]:
    """A dataset read from a stream in frames of at most `rows` rows (batch scoring holds one
    chunk at a time). CSV is not checked ahead, the stream being read once: a row with too few
    fields has missing values; too many is `malformed_csv`."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(stream).iter_batches(batch_size=rows):
                yield batch.to_pandas()
            return
        for chunk in pd.read_csv(stream, chunksize=rows, encoding=ENCODING):
            if not isinstance(chunk.index, pd.RangeIndex):
                # pandas takes a first data row longer than the header for an index
                raise PermanentError(
                    "malformed_csv", f"{source}: the first data row has more fields than the header"
                )
            chunk.columns = pd.Index([str(c).strip() for c in chunk.columns])
            yield chunk
    except pd.errors.EmptyDataError as exc:
        raise PermanentError("empty_dataset", f"{source} is empty") from exc
    except UnicodeDecodeError as exc:
        raise PermanentError("not_utf8", f"{source} is not UTF-8 text: {exc}") from exc
    except pd.errors.ParserError as exc:
        raise PermanentError("malformed_csv", f"{source} is not valid csv: {exc}") from exc
    except (ValueError, OSError) as exc:
        raise PermanentError("unreadable_dataset", f"{source} is not valid {fmt}: {exc}") from exc
