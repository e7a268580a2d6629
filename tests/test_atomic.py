"""Atomic outputs: all or nothing, and the permissions of an ordinary file or folder."""

import os

import pytest

from rs_lightning.soup.atomic import atomic_dir, atomic_file


def test_atomic_file_publishes_with_umask_permissions(tmp_path):
    with atomic_file(tmp_path / "a.json") as f:
        f.write("{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_all_or_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as d:
            (d / "part").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "out") as d:
        (d / "part").write_text("x")
    assert (tmp_path / "out" / "part").read_text() == "x"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(tmp_path / "out"):
            pass
    with atomic_dir(tmp_path / "out", overwrite=True) as d:
        (d / "new").write_text("y")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
