"""The validation job's verdict (mlpipe_batch.validate): parts checked in any order, the
problem of the lowest data row named; a problem of the whole file before any row's."""

from __future__ import annotations

from mlpipe_batch.validate import Verdict, repeated_key


def problem(row: int, reason: str = "wrong_type") -> dict:
    return {"kind": "problem", "reason": reason, "message": f"row {row}", "row": row}


def combine(*groups: list[dict]) -> dict:
    fn = Verdict()
    accs = []
    for group in groups:
        acc = fn.create_accumulator()
        for value in group:
            acc = fn.add_input(acc, value)
        accs.append(acc)
    return fn.extract_output(fn.merge_accumulators(accs))


def test_parts_combine_to_their_rows_features_and_lowest_bad_row() -> None:
    verdict = combine(
        [{"kind": "part", "rows": 5, "present": ["a"]}, problem(14)],
        [problem(9, "null_value"), {"kind": "part", "rows": 5, "present": ["b"]}],
    )

    assert verdict["rows"] == 10 and verdict["present"] == ["a", "b"]
    assert verdict["problem"]["row"] == 9 and verdict["problem"]["reason"] == "null_value"


def test_a_problem_of_the_whole_file_comes_before_any_row() -> None:
    verdict = combine([problem(3)], [problem(0, "malformed_csv")])

    assert verdict["problem"]["reason"] == "malformed_csv"


def test_a_repeated_key_is_named_by_its_second_row() -> None:
    (found,) = repeated_key((("s1", "t1"), [18, 3, 40]), "gs://b/x.csv", ["site", "time"])

    assert found["reason"] == "duplicate_key" and found["row"] == 18
    assert "[3, 18, 40]" in found["message"] and "gs://b/x.csv" in found["message"]
    assert list(repeated_key((("s2", "t1"), [5]), "gs://b/x.csv", ["site", "time"])) == []
