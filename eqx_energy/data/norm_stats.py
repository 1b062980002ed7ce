"""Normalization statistics: streaming computation and openpi's norm_stats.json format.

Per key, every leading axis is flattened (an action chunk (h, act) contributes h rows, edge repeats
included, as openpi's compute_norm_stats does). mean and std (population, ddof 0) are exact: f64
running moments merged with Chan's formula. q01/q99 come from 5000-bin per-dim histograms over the
running [min, max]; when the range grows the old counts are spread uniformly over the new bins. The
result for q is the left edge of the first bin whose cumulative count reaches q * count (openpi's
rule). Tests check that the fraction of the data below each estimate is within 1e-3 of q.

File: {"norm_stats": {"state": {"mean": [...], "std": [...], "q01": [...], "q99": [...]}, "actions": {...}}}
with the raw (unpadded) dims; q01/q99 may be null in old files.
"""

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from eqx_energy._files import atomic_write

_BINS = 5000
_FILE = "norm_stats.json"


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one key (float64 vectors of the raw dim)."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None


class RunningStats:
    """Streaming mean / std / histogram quantiles of vectors; `update` takes (..., dim) arrays."""

    def __init__(self, num_bins: int = _BINS):
        self.num_bins = num_bins
        self.count = 0
        self.mean = self.m2 = self.low = self.high = self.hist = None

    def update(self, batch: np.ndarray) -> None:
        x = np.asarray(batch, np.float64)
        x = x.reshape(-1, x.shape[-1] if x.ndim else 1)
        if not len(x):
            return
        n, mean = len(x), x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        low, high = x.min(0), x.max(0)
        if self.count == 0:
            self.mean, self.m2, self.low, self.high = mean, m2, low, high
            self.hist = np.zeros((x.shape[1], self.num_bins))
        else:
            if x.shape[1] != self.mean.shape[0]:
                raise ValueError(f"vectors of dim {x.shape[1]} after {self.mean.shape[0]}-dim ones; one key must "
                                 "keep one dim")
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
            if np.any(low < self.low) or np.any(high > self.high):
                self._rebin(np.minimum(low, self.low), np.maximum(high, self.high))
        self.count += n
        for d in range(x.shape[1]):
            self.hist[d] += np.histogram(x[:, d], bins=self._edges(d))[0]

    def _edges(self, d: int) -> np.ndarray:
        return np.linspace(self.low[d] - 1e-10, self.high[d] + 1e-10, self.num_bins + 1)

    def _rebin(self, low: np.ndarray, high: np.ndarray) -> None:
        """Spread each old bin's count uniformly over the new bins it overlaps (interpolated CDF)."""
        old = [self._edges(d) for d in range(len(low))]
        self.low, self.high = low, high
        for d, edges in enumerate(old):
            cdf = np.concatenate([[0.0], np.cumsum(self.hist[d])])
            self.hist[d] = np.diff(np.interp(self._edges(d), edges, cdf))

    def statistics(self) -> NormStats:
        if self.count < 2:
            raise ValueError(f"norm stats need at least 2 vectors; got {self.count}")
        cumsum = np.cumsum(self.hist, axis=1)
        quantiles = []
        for q in (0.01, 0.99):
            bins = [int(np.searchsorted(cumsum[d], q * self.count)) for d in range(len(cumsum))]
            quantiles.append(np.asarray([self._edges(d)[b] for d, b in enumerate(bins)]))
        return NormStats(mean=self.mean, std=np.sqrt(np.maximum(self.m2 / self.count, 0.0)),
                         q01=quantiles[0], q99=quantiles[1])


def compute_norm_stats(
    examples: Iterable[Mapping[str, Any]],
    keys: Sequence[str] = ("state", "actions"),
    *,
    max_examples: int | None = None,
    rows_per_update: int = 8192,
) -> dict[str, NormStats]:
    """Streams examples (e.g. a LeRobotSource(images=False) after the data transforms) into NormStats per key."""
    running = {k: RunningStats() for k in keys}
    buffers: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    rows = dict.fromkeys(keys, 0)
    for number, example in enumerate(examples):
        if max_examples is not None and number >= max_examples:
            break
        for k in keys:
            if k not in example:
                raise ValueError(f"example {number} has no key {k!r} (keys: {sorted(example)}); pass keys= "
                                 "that every example carries")
            value = np.asarray(example[k])
            buffers[k].append(value.reshape(-1, value.shape[-1] if value.ndim else 1))
            rows[k] += len(buffers[k][-1])
            if rows[k] >= rows_per_update:
                running[k].update(np.concatenate(buffers[k]))
                buffers[k], rows[k] = [], 0
    for k in keys:
        if buffers[k]:
            running[k].update(np.concatenate(buffers[k]))
    return {k: running[k].statistics() for k in keys}


def _as_list(x: np.ndarray | None) -> list[float] | None:
    return None if x is None else np.asarray(x, np.float64).tolist()


def save_norm_stats(stats: Mapping[str, NormStats], path: str | pathlib.Path) -> pathlib.Path:
    """Write openpi's norm_stats.json (indent 2) to `path`, a directory or a .json file, atomically;
    returns the file."""
    path = pathlib.Path(path)
    file = path if path.suffix == ".json" else path / _FILE
    body = {"norm_stats": {k: {f.name: _as_list(getattr(s, f.name)) for f in dataclasses.fields(NormStats)}
                           for k, s in stats.items()}}
    return atomic_write(file, json.dumps(body, indent=2))


def _find(path: pathlib.Path, asset_id: str | None) -> pathlib.Path:
    """A norm_stats.json file, a directory holding one, or an openpi checkpoint with assets/<id>/norm_stats.json."""
    if path.is_file():
        return path
    if (path / _FILE).is_file():
        return path / _FILE
    assets = path / "assets"
    if asset_id is not None and (assets / asset_id / _FILE).is_file():
        return assets / asset_id / _FILE
    found = sorted(assets.rglob(_FILE)) if assets.is_dir() else []
    if asset_id is None and len(found) == 1:
        return found[0]
    ids = [str(f.parent.relative_to(assets)) for f in found]
    raise FileNotFoundError(f"no {_FILE} at {path}" + (f" for asset_id={asset_id!r}" if asset_id else "")
                            + (f"; its assets hold {ids}: pass asset_id= one of them" if ids else
                               "; pass the file, its directory, or a checkpoint with assets/<asset_id>/" + _FILE))


def load_norm_stats(path: str | pathlib.Path, asset_id: str | None = None) -> dict[str, NormStats]:
    """Read openpi's norm_stats.json (from a file, its directory, or a checkpoint's assets) as float64 arrays."""
    file = _find(pathlib.Path(path), asset_id)
    try:
        body = json.loads(file.read_text(encoding="utf-8"))["norm_stats"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{file} is not an openpi norm_stats.json ({{\"norm_stats\": {{key: {{mean, std, q01, "
                         f"q99}}}}}}): {err!r}") from err
    out = {}
    for key, entry in body.items():
        if "mean" not in entry or "std" not in entry:
            raise ValueError(f"{file}: stats for {key!r} need 'mean' and 'std'; got keys {sorted(entry)}")
        arrays = {f.name: (None if entry.get(f.name) is None else np.asarray(entry[f.name], np.float64))
                  for f in dataclasses.fields(NormStats)}
        out[key] = NormStats(**arrays)
    return out
