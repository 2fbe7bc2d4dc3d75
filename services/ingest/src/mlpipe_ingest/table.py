"""Ingest's table: every source's rows as strings under one header, and the canonical bytes
it lands them as (CSV, or Parquet when the request asks for it)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

from mlpipe.errors import PermanentError
from mlpipe.ml.data import read_csv_text


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):  # JSON from an http or gcs source (Struct values are floats)
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value
    raise PermanentError("wrong_type", f"value {value!r} is a {type(value).__name__}, not a scalar")


def table_from_csv(text: str, source: str = "inline CSV") -> Table:
    """CSV text as a table, read by mlpipe.ml.data's one CSV reader."""
    return Table(*read_csv_text(text, source))


def table_from_records(records: list[dict[str, Any]]) -> Table:
    header: list[str] = []
    for record in records:
        for key in record:
            if key not in header:
                header.append(key)
    rows = [[_cell(r.get(k)) for k in header] for r in records]
    return Table(header, rows)


def to_csv_bytes(table: Table) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.header)
    writer.writerows(table.rows)
    return out.getvalue().encode()


def to_parquet_bytes(table: Table) -> bytes:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    arrow = pacsv.read_csv(io.BytesIO(to_csv_bytes(table)))
    out = io.BytesIO()
    pq.write_table(arrow, out)
    return out.getvalue()
