"""Streaming norm stats equal numpy over all data; openpi's norm_stats.json round trip and lookup."""

import json

import numpy as np
import pytest

from eqx_energy.data.norm_stats import NormStats, RunningStats, compute_norm_stats, load_norm_stats, save_norm_stats
from eqx_energy.data.source import LeRobotSource
from eqx_energy.data.transforms import DeltaActions, make_bool_mask
from eqx_energy.data.writer import write_lerobot_dataset


def _check(stats: NormStats, rows: np.ndarray) -> None:
    """mean/std exact; the data's empirical CDF crosses q within two bins above each quantile estimate."""
    np.testing.assert_allclose(stats.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.std, rows.std(0), rtol=1e-10, atol=1e-12)
    width = (rows.max(0) - rows.min(0)) / 5000
    for q, got in ((0.01, stats.q01), (0.99, stats.q99)):
        assert np.all((rows < got).mean(0) <= q + 1e-3) and np.all((rows < got + 2 * width).mean(0) >= q - 1e-3)


@pytest.mark.parametrize("rows_per_update", [16, 1000, 10**6])
def test_streaming_equals_numpy(rows_per_update):
    rng = np.random.default_rng(0)
    examples = [{"state": rng.normal(size=5) * [1, 2, 3, 4, 5] + np.arange(5) + i / 100,  # drifting range
                 "actions": rng.standard_t(3, size=(4, 3))} for i in range(2000)]
    stats = compute_norm_stats(examples, rows_per_update=rows_per_update)
    _check(stats["state"], np.stack([e["state"] for e in examples]))
    _check(stats["actions"], np.concatenate([e["actions"] for e in examples]))


def test_over_a_dataset_after_delta_actions(tmp_path):
    """openpi's recipe: chunks of H rows per frame (edge repeats included), after DeltaActions."""
    rng = np.random.default_rng(0)
    episodes = [{"state": rng.normal(size=(n, 8)).astype(np.float32),
                 "actions": rng.normal(size=(n, 7)).astype(np.float32)} for n in (30, 45, 25)]
    write_lerobot_dataset(tmp_path, [(e, "t") for e in episodes], fps=10)
    source = LeRobotSource(tmp_path, 5, images=False)
    delta = DeltaActions(make_bool_mask(6, -1))
    stats = compute_norm_stats((delta(source[i]) for i in range(len(source))), rows_per_update=100)
    states, chunks = [], []
    for e in episodes:
        for t in range(len(e["state"])):
            chunk = e["actions"][np.minimum(t + np.arange(5), len(e["state"]) - 1)]  # float32, as stored
            chunk[:, :6] -= e["state"][t, :6]
            states.append(e["state"][t])
            chunks.append(chunk)
    _check(stats["state"], np.stack(states).astype(np.float64))
    _check(stats["actions"], np.concatenate(chunks).astype(np.float64))


def test_json_round_trip_in_openpi_format(tmp_path):
    stats = {"state": NormStats(mean=np.array([0.1, -2.0]), std=np.array([1.5, 0.25]),
                                q01=np.array([-3.0, -2.5]), q99=np.array([3.25, -1.0])),
             "actions": NormStats(mean=np.array([1 / 3]), std=np.array([2 / 3]))}
    file = save_norm_stats(stats, tmp_path / "assets" / "physical-intelligence" / "libero")
    body = json.loads(file.read_text())
    assert body == {"norm_stats": {
        "state": {"mean": [0.1, -2.0], "std": [1.5, 0.25], "q01": [-3.0, -2.5], "q99": [3.25, -1.0]},
        "actions": {"mean": [1 / 3], "std": [2 / 3], "q01": None, "q99": None}}}
    for where in (file, file.parent, tmp_path):  # the file, its directory, a checkpoint with assets/<id>/
        loaded = load_norm_stats(where)
        for key in stats:
            for field in ("mean", "std", "q01", "q99"):
                a, b = getattr(stats[key], field), getattr(loaded[key], field)
                assert (a is None and b is None) or (np.array_equal(a, b) and b.dtype == np.float64)
    save_norm_stats(stats, tmp_path / "assets" / "other")
    with pytest.raises(FileNotFoundError, match="pass asset_id= one of them"):
        load_norm_stats(tmp_path)
    assert load_norm_stats(tmp_path, asset_id="other")["state"].q99[0] == 3.25


def test_errors():
    with pytest.raises(ValueError, match="at least 2"):
        compute_norm_stats([{"state": np.zeros(3)}], keys=("state",))
    with pytest.raises(ValueError, match="has no key 'actions'"):
        compute_norm_stats([{"state": np.zeros(3)}])
    running = RunningStats()
    running.update(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="one key must keep one dim"):
        running.update(np.zeros((3, 4)))
