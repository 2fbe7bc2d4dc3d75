"""The dataset checks run part by part (what a large landing's validation job does): each
part's checks name rows of the whole dataset, and the parts together decide what one frame
does."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from mlpipe.errors import PermanentError
from mlpipe.ml.config import parse_config
from mlpipe.ml.data import read_csv_text_chunks
from mlpipe.ml.validation import (
    BadRow,
    check_chunk,
    check_dataset,
    check_features_present,
    check_header,
    check_row_count,
)

WEATHER = parse_config(
    """\
name: weather
dataset:
  target: temp
  columns: {station: categorical, observed: datetime}
  required_non_null: [humidity]
  min_rows: 2
  max_rows: 100
model:
  name: weather-temp
  task: regression
  estimator: sklearn.linear_model.Ridge
"""
)
COLUMNS = ["station", "observed", "humidity", "wind", "temp"]


def rows(n: int) -> list[list[str]]:
    return [["a", f"2026-06-01T{i % 24:02d}:00:00Z", str(50 + i), "", str(i)] for i in range(n)]


def parts(lines: list[list[str]], size: int) -> list[tuple[int, pd.DataFrame]]:
    return [
        (start + 1, pd.DataFrame(lines[start : start + size], columns=COLUMNS, dtype=str))
        for start in range(0, len(lines), size)
    ]


def check_in_parts(lines: list[list[str]], size: int) -> list[str]:
    """check_dataset's verdict reached through the part-by-part checks."""
    features = check_header(COLUMNS, WEATHER, "w.csv")
    present: set[str] = set()
    for first, frame in parts(lines, size):
        present |= check_chunk(frame, WEATHER, features, "w.csv", first)
    check_row_count(len(lines), WEATHER, "w.csv")
    check_features_present(features, present, "w.csv")
    return features


def test_a_bad_value_is_named_by_its_row_in_the_whole_dataset() -> None:
    lines = rows(12)
    lines[8][2] = "damp"  # data row 9: the second part of five rows, its fourth row

    with pytest.raises(BadRow) as whole:
        check_dataset(pd.DataFrame(lines, columns=COLUMNS, dtype=str), WEATHER, "w.csv")
    with pytest.raises(BadRow) as in_parts:
        check_in_parts(lines, 5)

    assert whole.value.reason == in_parts.value.reason == "wrong_type"
    assert whole.value.row == in_parts.value.row == 9
    assert "'damp' on data row 9" in in_parts.value.message


def test_a_missing_required_value_names_its_rows_in_the_whole_dataset() -> None:
    lines = rows(12)
    lines[10][2] = ""
    lines[11][2] = " "

    with pytest.raises(BadRow) as raised:
        check_in_parts(lines, 5)

    assert raised.value.reason == "null_value" and raised.value.row == 11
    assert "data rows [11, 12]" in raised.value.message


def test_a_feature_is_empty_only_if_every_part_lacks_it() -> None:
    lines = rows(12)
    lines[7][3] = "3.5"  # wind has one value, in the second part

    assert check_in_parts(lines, 5) == check_dataset(
        pd.DataFrame(lines, columns=COLUMNS, dtype=str), WEATHER, "w.csv"
    )
    with pytest.raises(PermanentError) as raised:
        check_in_parts(rows(12), 5)
    assert raised.value.reason == "all_nan_feature" and "'wind'" in raised.value.message


def test_the_row_count_and_the_header_are_checked_on_the_whole() -> None:
    with pytest.raises(PermanentError) as too_many:
        check_row_count(101, WEATHER, "w.csv")
    with pytest.raises(PermanentError) as missing:
        check_header(["station", "observed", "wind", "temp"], WEATHER, "w.csv")

    assert too_many.value.reason == "row_count" and "101 rows" in too_many.value.message
    assert missing.value.reason == "missing_column" and "'humidity'" in missing.value.message


def test_csv_is_read_in_parts_by_the_one_csv_reader() -> None:
    text = "a, b\n1,2\n\n3,4\n5,6\n"

    read = list(read_csv_text_chunks(io.BytesIO(text.encode()), "x.csv", 2))

    assert read == [(["a", "b"], [["1", "2"], ["3", "4"]]), (["a", "b"], [["5", "6"]])]


def test_a_malformed_line_found_late_is_named_by_its_line() -> None:
    text = "a,b\n1,2\n3,4\n5,6,7\n"

    with pytest.raises(PermanentError) as raised:
        list(read_csv_text_chunks(io.BytesIO(text.encode()), "x.csv", 1))

    assert raised.value.reason == "malformed_csv" and "x.csv line 4" in raised.value.message


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(PermanentError) as raised:
        list(read_csv_text_chunks(io.BytesIO(b"a,b\n\xff,1\n"), "x.csv", 10))

    assert raised.value.reason == "not_utf8"
