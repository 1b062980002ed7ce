"""Files the project writes: an interrupted write leaves the old file whole (the shared atomic_write
and the writers that use it), and an output directory that holds results is never reused."""

import os

import numpy as np
import pytest

from eqx_energy import _files
from eqx_energy._files import atomic_write, unused_dir
from eqx_energy.data.norm_stats import NormStats, load_norm_stats, save_norm_stats
from eqx_energy.train.config import write_config


class DiskFull(OSError):
    pass


def fail_midway(monkeypatch):
    """Make the next write die after some bytes reached the temporary file (before it is synced)."""

    def fsync(fd):
        raise DiskFull("no space left on device")

    monkeypatch.setattr(_files.os, "fsync", fsync)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "sub" / "a.json", '{"v": 1}')
    assert path.read_text() == '{"v": 1}'
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = atomic_write(tmp_path / "a.json", "old contents")
    fail_midway(monkeypatch)
    with pytest.raises(DiskFull):
        atomic_write(path, "new contents, " * 1000)
    assert path.read_text() == "old contents"
    assert os.listdir(tmp_path) == ["a.json"]  # the partial temporary file is gone


def test_failed_norm_stats_and_config_writes_keep_the_old_files(tmp_path, monkeypatch):
    old = {"actions": NormStats(mean=np.array([1.0, 2.0]), std=np.array([0.5, 0.25]))}
    file = save_norm_stats(old, tmp_path)
    (tmp_path / "config.yaml").write_text("kept: true\n")
    fail_midway(monkeypatch)
    with pytest.raises(DiskFull):
        save_norm_stats({"actions": NormStats(mean=np.zeros(2), std=np.ones(2))}, tmp_path)
    with pytest.raises(DiskFull):
        write_config({"kept": False}, tmp_path / "config.yaml")
    monkeypatch.undo()
    assert np.array_equal(load_norm_stats(file)["actions"].mean, [1.0, 2.0])
    assert (tmp_path / "config.yaml").read_text() == "kept: true\n"
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "norm_stats.json"]


def test_unused_dir_never_reuses_a_dir_with_files(tmp_path):
    out = tmp_path / "eval"
    assert unused_dir(out) == out and out.is_dir()
    assert unused_dir(out) == out  # still empty: nothing to lose
    (out / "report.json").write_text("{}")
    assert unused_dir(out) == tmp_path / "eval-2"
    (tmp_path / "eval-2" / "results.json").write_text("{}")
    assert unused_dir(out) == tmp_path / "eval-3"
    assert (out / "report.json").read_text() == "{}"
