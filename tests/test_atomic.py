"""dsl.atomic: a file is written whole or not at all, and nothing temporary stays behind."""

import json

import pytest

from dsl.atomic import atomic_paths, write_bytes_atomic, write_json_atomic, write_text_atomic


def test_writes_whole_files_creating_parents(tmp_path):
    write_json_atomic(tmp_path / "a" / "doc.json", {"b": 1, "a": [2]})
    assert (tmp_path / "a" / "doc.json").read_text() == json.dumps({"a": [2], "b": 1}, indent=2) + "\n"
    write_bytes_atomic(tmp_path / "x.bin", b"\x00\x01", fsync=True)
    write_text_atomic(tmp_path / "x.bin", "η")                 # replaces the previous file
    assert (tmp_path / "x.bin").read_text(encoding="utf-8") == "η"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "x.bin"]


def test_a_failure_keeps_the_old_files_and_leaves_no_temporary(tmp_path):
    first, second = tmp_path / "one.txt", tmp_path / "two.txt"
    first.write_text("old")
    with pytest.raises(RuntimeError), atomic_paths(first, second) as (t1, t2):
        t1.write_text("new")
        t2.write_text("new")
        raise RuntimeError("half-way")
    assert first.read_text() == "old" and not second.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["one.txt"]


def test_several_files_land_together_and_a_directory_can_be_one(tmp_path):
    with atomic_paths(tmp_path / "f.txt", tmp_path / "d") as (f, d):
        f.write_text("f")
        d.mkdir()
        (d / "inner").write_text("i")
    assert (tmp_path / "f.txt").read_text() == "f" and (tmp_path / "d" / "inner").read_text() == "i"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]
