"""Ingest's table: inline rows to a table (through the one CSV reader) and canonical bytes."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from mlpipe.errors import PermanentError
from mlpipe_ingest.table import (
    Table,
    table_from_csv,
    table_from_records,
    to_csv_bytes,
    to_parquet_bytes,
)


def test_csv_text_becomes_a_table_with_stripped_cells() -> None:
    table = table_from_csv("length, width ,species\n1.5, 2 ,setosa\n3,4, virginica \n")

    assert table.header == ["length", "width", "species"]
    assert table.rows == [["1.5", "2", "setosa"], ["3", "4", "virginica"]]


def test_blank_lines_are_skipped() -> None:
    table = table_from_csv("a,b\n\n1,2\n\n\n3,4\n")

    assert table.rows == [["1", "2"], ["3", "4"]]


@pytest.mark.parametrize(
    ("text", "line", "fields"),
    [
        ("a,b\n1,2\n3\n", 3, 1),
        ("a,b\n1,2,3\n", 2, 3),
        ("a,b\n1,2\n\n\n4,5,6\n", 5, 3),
    ],
)
def test_a_row_with_the_wrong_field_count_names_its_line(text: str, line: int, fields: int) -> None:
    with pytest.raises(PermanentError) as caught:
        table_from_csv(text)

    assert caught.value.reason == "malformed_csv"
    assert f"line {line} has {fields} fields; the header has 2" in caught.value.message


def test_a_duplicate_header_is_refused() -> None:
    with pytest.raises(PermanentError) as caught:
        table_from_csv("a,b, a\n1,2,3\n")

    assert caught.value.reason == "malformed_csv"
    assert "repeats a column" in caught.value.message


def test_an_empty_csv_is_an_empty_dataset() -> None:
    with pytest.raises(PermanentError) as caught:
        table_from_csv("")

    assert caught.value.reason == "empty_dataset"


def test_a_header_only_csv_is_header_only() -> None:
    with pytest.raises(PermanentError) as caught:
        table_from_csv("length,width,species\n")

    assert caught.value.reason == "header_only"
    assert caught.value.message == "inline CSV has a header but no rows"


def test_an_empty_header_line_is_malformed() -> None:
    with pytest.raises(PermanentError) as caught:
        table_from_csv(" , \n1,2\n")

    assert caught.value.reason == "malformed_csv"
    assert "empty header line" in caught.value.message


def test_records_become_a_table_with_the_union_of_keys_in_first_seen_order() -> None:
    records = [
        {"length": 1.0, "species": "setosa"},
        {"width": 2.5, "length": 3.0, "species": "virginica", "ok": True},
        {"species": None, "length": float("nan")},
    ]

    table = table_from_records(records)

    assert table.header == ["length", "species", "width", "ok"]
    assert table.rows == [
        ["1", "setosa", "", ""],
        ["3", "virginica", "2.5", "true"],
        ["", "", "", ""],
    ]


@pytest.mark.parametrize("value", [[1, 2], {"nested": 1}])
def test_a_record_value_that_is_not_a_scalar_is_refused(value: object) -> None:
    with pytest.raises(PermanentError) as caught:
        table_from_records([{"length": value}])

    assert caught.value.reason == "wrong_type"


def test_canonical_csv_uses_lf_and_quotes_only_when_needed() -> None:
    table = Table(["name", "note"], [["a", "plain"], ["b", 'has, comma and "quotes"']])

    data = to_csv_bytes(table)

    assert data == b'name,note\na,plain\nb,"has, comma and ""quotes"""\n'


@pytest.mark.parametrize(
    "text",
    [
        "length,width,species\r\n1.5,2,setosa\r\n3,4,virginica\r\n",
        " length , width , species \n 1.5 , 2 , setosa \n3,4,virginica",
        "length,width,species\n\n1.5,2,setosa\n\n3,4,virginica\n\n",
    ],
    ids=["crlf", "whitespace-no-final-newline", "blank-lines"],
)
def test_the_same_content_gives_the_same_bytes(text: str) -> None:
    reference = to_csv_bytes(table_from_csv("length,width,species\n1.5,2,setosa\n3,4,virginica\n"))

    assert to_csv_bytes(table_from_csv(text)) == reference


def test_records_and_csv_with_the_same_content_give_the_same_bytes() -> None:
    from_records = table_from_records(
        [
            {"length": 1.5, "width": 2.0, "species": "setosa"},
            {"length": 3.0, "width": 4.0, "species": "virginica"},
        ]
    )
    from_csv = table_from_csv("length,width,species\n1.5,2,setosa\n3,4,virginica\n")

    assert to_csv_bytes(from_records) == to_csv_bytes(from_csv)


def test_parquet_bytes_read_back_as_the_same_table() -> None:
    table = Table(["length", "width", "species"], [["1.5", "2", "setosa"], ["3", "", "virginica"]])

    data = to_parquet_bytes(table)
    read = pq.read_table(io.BytesIO(data))

    assert read.column_names == ["length", "width", "species"]
    assert read.column("length").to_pylist() == [1.5, 3.0]
    assert read.column("width").to_pylist() == [2, None]
    assert read.column("species").to_pylist() == ["setosa", "virginica"]


def test_parquet_bytes_are_deterministic() -> None:
    table = Table(["a", "b"], [["1", "x"], ["2", "y"]])

    assert to_parquet_bytes(table) == to_parquet_bytes(Table(["a", "b"], [["1", "x"], ["2", "y"]]))
