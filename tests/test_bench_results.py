"""The committed benchmark results keep the shape DESIGN.md §8 fixes (outside tools read them)."""
from __future__ import annotations

import datetime
import json
import pathlib

import pytest

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "bench" / "results"
FILES = sorted(RESULTS.glob("*.json"))


def test_there_are_results():
    assert {p.stem for p in FILES} >= {"codec", "session", "server", "store"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_result_file_shape(path):
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == path.stem
    datetime.datetime.fromisoformat(doc["when"])
    assert isinstance(doc["machine"], dict)
    assert doc["rows"]
    for row in doc["rows"]:
        assert set(row) == {"case", "metric", "value", "unit", "baseline", "baseline_value",
                            "ratio"}
        assert isinstance(row["case"], str) and isinstance(row["metric"], str)
        assert isinstance(row["value"], (int, float)) and isinstance(row["unit"], str)
        assert row["baseline"] is None or isinstance(row["baseline"], str)
        for k in ("baseline_value", "ratio"):
            assert row[k] is None or isinstance(row[k], (int, float))
