"""Reading datasets: the one CSV reader, typed frames, and chunks."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from mlpipe.errors import PermanentError
from mlpipe.ml.data import read_csv_text, read_dataset, read_dataset_chunks


@pytest.mark.parametrize("data", [b"", b"  \n\n"])
def test_reading_empty_bytes_is_an_empty_dataset(data: bytes) -> None:
    with pytest.raises(PermanentError) as caught:
        read_dataset(data, "csv", "gs://b/datasets/x.csv")

    assert caught.value.reason == "empty_dataset"
    assert "gs://b/datasets/x.csv is empty" in caught.value.message


def test_bytes_that_are_not_parquet_are_unreadable() -> None:
    with pytest.raises(PermanentError) as caught:
        read_dataset(b"a,b\n1,2\n", "parquet", "gs://b/x.parquet")

    assert caught.value.reason == "unreadable_dataset"


def test_a_csv_is_read_into_a_frame() -> None:
    frame = read_dataset(b"x,label\n1.5,a\n2,b\n", "csv", "s")

    assert list(frame.columns) == ["x", "label"]
    assert frame["x"].tolist() == [1.5, 2.0]


def test_csv_text_is_read_with_stripped_cells_and_blank_lines_skipped() -> None:
    header, rows = read_csv_text(" a , b\n\n1, 2 \n\n3,4\n", "src")

    assert header == ["a", "b"]
    assert rows == [["1", "2"], ["3", "4"]]


@pytest.mark.parametrize(
    ("text", "reason", "message"),
    [
        ("", "empty_dataset", "src is empty"),
        (" \n\n", "empty_dataset", "src is empty"),
        ("a,b\n", "header_only", "src has a header but no rows"),
        ("a,b\n1,2\n3\n", "malformed_csv", "src line 3 has 1 fields; the header has 2"),
        ("a,b\n1,2,3\n", "malformed_csv", "src line 2 has 3 fields; the header has 2"),
        ("a,b, a\n1,2,3\n", "malformed_csv", "src header repeats a column: ['a', 'b', 'a']"),
        (" , \n1,2\n", "malformed_csv", "src has an empty header line"),
    ],
)
def test_csv_that_cannot_be_a_table_names_its_reason_and_line(
    text: str, reason: str, message: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        read_csv_text(text, "src")

    assert caught.value.reason == reason
    assert message in caught.value.message


@pytest.mark.parametrize(
    "data", [b"a,b\n", b"a,b\n1,2\n3\n", b"a,a\n1,2\n", b"a,b\n1,2\n\n\n4,5,6\n"]
)
def test_a_csv_file_fails_as_its_text_does(data: bytes) -> None:
    with pytest.raises(PermanentError) as text_failure:
        read_csv_text(data.decode(), "s")
    with pytest.raises(PermanentError) as file_failure:
        read_dataset(data, "csv", "s")

    assert (file_failure.value.reason, file_failure.value.message) == (
        text_failure.value.reason,
        text_failure.value.message,
    )


def test_a_csv_file_that_is_not_utf8_is_named() -> None:
    with pytest.raises(PermanentError) as caught:
        read_dataset(b"a,b\n1,s\xe9tosa\n", "csv", "gs://b/x.csv")

    assert caught.value.reason == "not_utf8"
    assert "gs://b/x.csv is not UTF-8 text" in caught.value.message


def test_header_names_are_stripped_as_in_csv_text() -> None:
    frame = read_dataset(b"\xef\xbb\xbf x , label \n1,a\n", "csv", "s")

    assert list(frame.columns) == ["x", "label"]


def test_chunks_of_a_csv_stream_cover_every_row() -> None:
    data = b"x,label\n" + b"".join(b"%d,a\n" % i for i in range(25))

    chunks = list(read_dataset_chunks(io.BytesIO(data), "csv", "s", rows=10))

    assert [len(c) for c in chunks] == [10, 10, 5]
    assert pd.concat(chunks)["x"].tolist() == list(range(25))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_dataset"),
        (b"x,label\n1,a,extra\n", "malformed_csv"),
        (b"x,label\n1,a\n2,b,extra\n", "malformed_csv"),
        (b"x,label\n1,\xff\n", "not_utf8"),
    ],
)
def test_a_stream_that_cannot_be_read_names_its_reason(data: bytes, reason: str) -> None:
    with pytest.raises(PermanentError) as caught:
        list(read_dataset_chunks(io.BytesIO(data), "csv", "gs://b/in.csv", rows=10))

    assert caught.value.reason == reason
    assert "gs://b/in.csv" in caught.value.message
