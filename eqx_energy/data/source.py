"""A grain random-access source over a LeRobot v2.x dataset directory (pyarrow only; no torch).

Item i is frame t of episode e (episodes in the selected split, in index order):
  <camera>: uint8 (H, W, 3) for each "image" feature, decoded lazily from the PNG/JPEG bytes;
  <feature>: the frame's value for every other numeric feature (e.g. state (8,));
  actions: (h, act) = rows t .. t+h-1 of the action feature, clamped to the episode's last row
           (edge repeat, as lerobot's delta_timestamps and openpi do);
  action_valid: (h,) bool, True where t+k < episode length (lerobot's `actions_is_pad`, negated);
  prompt: the frame's task string; episode_index, frame_index: int64 scalars.

Held-out episodes: `holdout_episodes(E, fraction, seed)` picks round(fraction * E) episodes by a
seeded permutation; split="train" reads the others, split="holdout" only those.
"""

import collections
import io
import json
import pathlib
import threading
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from eqx_energy.data import _format

Split = Literal["all", "train", "holdout"]
_REQUIRED_INFO = ("codebase_version", "total_episodes", "total_frames", "chunks_size", "fps", "data_path",
                  "features")


def holdout_episodes(num_episodes: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted episode indices held out for evaluation: the first round(fraction * E) of a seeded permutation."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1); got {fraction}")
    count = int(round(fraction * num_episodes))
    return np.sort(np.random.default_rng(seed).permutation(num_episodes)[:count]).astype(np.int64)


def _read_info(root: pathlib.Path) -> dict[str, Any]:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise ValueError(f"{root} is not a LeRobot dataset: {path} is missing (expected a LeRobot v2.x directory "
                         "with meta/info.json, meta/tasks.jsonl, meta/episodes.jsonl and data/)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    missing = [k for k in _REQUIRED_INFO if k not in info]
    if missing:
        raise ValueError(f"{path} lacks required keys {missing}; is this a LeRobot v2.x info.json?")
    if info["codebase_version"] not in _format.READABLE_VERSIONS:
        raise ValueError(f"{path}: codebase_version {info['codebase_version']!r} is not supported; expected one "
                         f"of {_format.READABLE_VERSIONS} (v3.0 datasets must be converted back to v2.1)")
    for name, spec in info["features"].items():
        if not isinstance(spec, dict) or "dtype" not in spec or "shape" not in spec:
            raise ValueError(f"{path}: feature {name!r} needs 'dtype' and 'shape'; got {spec!r}")
        if spec["dtype"] == "video":
            raise ValueError(f"{path}: feature {name!r} is stored as video, which this reader does not decode; "
                             "re-encode the dataset with image features (frames inside the parquet)")
    absent = [k for k in _format.DEFAULT_FEATURES if k not in info["features"]]
    if absent:
        raise ValueError(f"{path}: features lack the bookkeeping columns {absent}")
    return info


def _check_schema(path: pathlib.Path, schema: pa.Schema, features: dict[str, Any]) -> None:
    """The parquet columns must be exactly info.json's features, with the declared types."""
    if list(schema.names) != list(features):
        raise ValueError(f"{path} has columns {schema.names} but meta/info.json declares features "
                         f"{list(features)}; the info.json does not describe this dataset")
    for name, spec in features.items():
        got, want = schema.field(name).type, _format.arrow_type(spec)
        same = got == want
        if pa.types.is_fixed_size_list(want) and (pa.types.is_list(got) or pa.types.is_fixed_size_list(got)):
            size_ok = pa.types.is_list(got) or got.list_size == want.list_size
            same = size_ok and got.value_type == want.value_type
        if not same:
            raise ValueError(f"{path}: column {name!r} has arrow type {got} but meta/info.json declares "
                             f"dtype {spec['dtype']} shape {spec['shape']} (arrow {want}); the info.json is wrong "
                             "or the file comes from another dataset")


def _open_parquet(path: pathlib.Path) -> pq.ParquetFile:
    if not path.is_file():
        raise ValueError(f"episode file {path} is missing; the dataset is incomplete")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"cannot read {path}: {err}. The file is truncated or corrupt; re-generate or "
                         "re-download this episode") from err


def _to_numpy(column: pa.ChunkedArray, spec: dict[str, Any]) -> np.ndarray:
    array = column.combine_chunks()
    if spec["shape"] == [1]:
        return array.to_numpy(zero_copy_only=False).astype(spec["dtype"], copy=False)
    values = array.flatten().to_numpy(zero_copy_only=False).astype(spec["dtype"], copy=False)
    return values.reshape(len(array), spec["shape"][0])


_CACHE_LOCK = threading.Lock()  # guards every source's open-episode cache against grain's reader threads


class _Episode:
    """One opened episode file: numeric columns in memory, image bytes read per row group on demand."""

    def __init__(self, path: pathlib.Path, info: dict[str, Any], length: int):
        self.path, self.file = path, _open_parquet(path)
        features = info["features"]
        _check_schema(path, self.file.schema_arrow, features)
        if self.file.metadata.num_rows != length:
            raise ValueError(f"{path} has {self.file.metadata.num_rows} rows but meta/episodes.jsonl says "
                             f"length {length}")
        self.images = [k for k, s in features.items() if s["dtype"] == "image"]
        other = [k for k in features if k not in self.images]
        table = self._read(lambda: self.file.read(columns=other))
        self.columns = {k: (table[k].to_pylist() if features[k]["dtype"] == "string"
                            else _to_numpy(table[k], features[k])) for k in other}
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.group_end = np.cumsum(sizes)
        self._group: tuple[int, dict[str, pa.Array]] | None = None
        self._lock = threading.Lock()  # grain's reader threads share this open file and its row-group cache

    def _read(self, fn):
        try:
            return fn()
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"cannot read {self.path}: {err}. The file is truncated or corrupt; re-generate "
                             "or re-download this episode") from err

    def image_bytes(self, name: str, row: int) -> bytes:
        group = int(np.searchsorted(self.group_end, row, side="right"))
        with self._lock:
            if self._group is None or self._group[0] != group:
                table = self._read(lambda: self.file.read_row_group(group, columns=self.images))
                self._group = (group, {k: table[k].combine_chunks().field("bytes") for k in self.images})
            columns = self._group[1]
        start = 0 if group == 0 else int(self.group_end[group - 1])
        return columns[name][row - start].as_py()


class LeRobotSource:
    """grain RandomAccessDataSource over a LeRobot v2.x directory; items as in the module docstring."""

    def __init__(
        self,
        root: str | pathlib.Path,
        action_horizon: int,
        *,
        split: Split = "all",
        holdout_fraction: float = 0.0,
        holdout_seed: int = 0,
        action_key: str = "actions",
        images: bool = True,
        cache_episodes: int = 32,
    ):
        self.root = pathlib.Path(root)
        if action_horizon < 1:
            raise ValueError(f"action_horizon must be >= 1; got {action_horizon}")
        if split not in ("all", "train", "holdout"):
            raise ValueError(f"split must be 'all', 'train' or 'holdout'; got {split!r}")
        self.action_horizon, self.split, self.action_key, self.images = action_horizon, split, action_key, images
        self.holdout_fraction, self.holdout_seed, self.cache_episodes = holdout_fraction, holdout_seed, cache_episodes
        self.info = _read_info(self.root)
        features = self.info["features"]
        if action_key not in features or len(features[action_key]["shape"]) != 1:
            vectors = [k for k, s in features.items() if s["dtype"] not in ("image", "string")]
            raise ValueError(f"action_key {action_key!r} is not a vector feature of {self.root}; its numeric "
                             f"features are {vectors}")
        self.tasks = {int(r["task_index"]): r["task"] for r in _format.read_jsonl(self.root / "meta" / "tasks.jsonl")}
        rows = sorted(_format.read_jsonl(self.root / "meta" / "episodes.jsonl"), key=lambda r: r["episode_index"])
        lengths = np.asarray([r["length"] for r in rows], np.int64)
        if [r["episode_index"] for r in rows] != list(range(len(rows))) or len(rows) != self.info["total_episodes"]:
            raise ValueError(f"{self.root}/meta/episodes.jsonl lists episodes {[r['episode_index'] for r in rows]} "
                             f"but info.json has total_episodes={self.info['total_episodes']}; expected 0..E-1")
        if int(lengths.sum()) != self.info["total_frames"]:
            raise ValueError(f"{self.root}: episode lengths sum to {int(lengths.sum())} but info.json has "
                             f"total_frames={self.info['total_frames']}")
        held = holdout_episodes(len(rows), holdout_fraction, holdout_seed)
        chosen = {"all": np.arange(len(rows)), "holdout": held,
                  "train": np.setdiff1d(np.arange(len(rows)), held)}[split]
        self.episodes = chosen.astype(np.int64)
        self.lengths = lengths[self.episodes]
        self._ends = np.cumsum(self.lengths)
        self._cache: collections.OrderedDict[int, _Episode] = collections.OrderedDict()
        if len(self.episodes):
            self._episode(0)  # fail at construction, not in a worker, if the files do not match info.json

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __repr__(self) -> str:
        return (f"LeRobotSource(root={str(self.root)!r}, action_horizon={self.action_horizon}, split={self.split!r}, "
                f"holdout_fraction={self.holdout_fraction}, holdout_seed={self.holdout_seed}, "
                f"action_key={self.action_key!r}, images={self.images}, frames={len(self)})")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": collections.OrderedDict()}  # open files stay in their process

    def _episode(self, position: int) -> _Episode:
        with _CACHE_LOCK:
            return self._cached_episode(position)

    def _cached_episode(self, position: int) -> _Episode:
        episode = self._cache.get(position)
        if episode is None:
            index = int(self.episodes[position])
            episode = _Episode(_format.episode_file(self.root, self.info, index), self.info,
                               int(self.lengths[position]))
            self._cache[position] = episode
            if len(self._cache) > self.cache_episodes:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(position)
        return episode

    def _decode(self, episode: _Episode, name: str, row: int) -> np.ndarray:
        image = Image.open(io.BytesIO(episode.image_bytes(name, row)))
        array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        shape = list(self.info["features"][name]["shape"])
        names = self.info["features"][name].get("names") or []
        hwc = shape[1:] + shape[:1] if names and names[0] in ("channel", "channels") else shape
        if list(array.shape) != hwc:
            raise ValueError(f"{episode.path} row {row}: image {name!r} decodes to {array.shape} but "
                             f"meta/info.json declares {shape}")
        return array

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} out of range for {len(self)} frames")
        position = int(np.searchsorted(self._ends, index, side="right"))
        row = index - (int(self._ends[position - 1]) if position else 0)
        episode = self._episode(position)
        length = int(self.lengths[position])
        item: dict[str, Any] = {}
        for name, spec in self.info["features"].items():
            if spec["dtype"] == "image":
                if self.images:
                    item[name] = self._decode(episode, name, row)
            elif name not in _format.DEFAULT_FEATURES and name != self.action_key:
                item[name] = np.array(episode.columns[name][row])  # a copy: callers may mutate
        steps = row + np.arange(self.action_horizon)
        item["actions"] = episode.columns[self.action_key][np.minimum(steps, length - 1)]
        item["action_valid"] = steps < length
        item["prompt"] = self.tasks[int(episode.columns["task_index"][row])]
        item["episode_index"] = np.int64(self.episodes[position])
        item["frame_index"] = np.int64(row)
        return item
