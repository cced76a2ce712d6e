"""Atomic writes and checked JSON reads."""

from __future__ import annotations

import json
import os

import pytest

from usagg.errors import DataError, TrainingError
from usagg.io import append_jsonl, read_json_file, write_json_atomic


def test_atomic_write_replaces_whole_file(tmp_path):
    file = tmp_path / "sub" / "state.json"
    write_json_atomic(file, {"a": 1, "path": tmp_path})
    write_json_atomic(file, {"b": 2})
    assert json.loads(file.read_text()) == {"b": 2}
    assert os.listdir(file.parent) == ["state.json"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    file = tmp_path / "state.json"
    write_json_atomic(file, {"a": 1})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json_atomic(file, {"a": object()})
    assert json.loads(file.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_read_json_file_round_trip_and_errors(tmp_path):
    file = tmp_path / "x.json"
    append_jsonl(file, {"k": [1, 2]})
    assert read_json_file(file) == {"k": [1, 2]}
    file.write_text("{broken")
    with pytest.raises(DataError, match=r"x.json: cannot read it as JSON: Expecting property name.*line 1 column 2"):
        read_json_file(file)
    file.write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(DataError, match="cannot read the manifest: 'utf-8' codec can't decode.*; generate it again"):
        read_json_file(file, "the manifest", fix="generate it again")
    with pytest.raises(TrainingError, match="missing.json: cannot read the pointer: .*No such file"):
        read_json_file(tmp_path / "missing.json", "the pointer", error=TrainingError)
