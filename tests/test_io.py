"""Artifacts are written atomically: an interrupted write never replaces an earlier result."""

from __future__ import annotations

import pytest

from lit_safety.io import atomic_dir, atomic_file, check_parent_exists


def test_interrupted_directory_write_keeps_previous(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "weights.bin").write_text("partial")
            raise KeyboardInterrupt  # killed mid-save
    assert (out / "weights.bin").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dir left
    with atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_text("v2")
    assert (out / "weights.bin").read_text() == "v2"


def test_interrupted_file_write_keeps_previous(tmp_path):
    path = tmp_path / "summary.json"
    with atomic_file(path) as handle:
        handle.write("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as handle:
            handle.write("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_missing_parent_is_named(tmp_path):
    check_parent_exists(tmp_path / "outputs" / "set")  # one missing level is created on write
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no" / "such")):
        check_parent_exists(tmp_path / "no" / "such" / "out")
