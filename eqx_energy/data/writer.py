"""Write any LeRobot v2.1 dataset (images inside the parquet files), one episode at a time.

Used by the Meta-World generator (eqx_energy.sim) and by the test fixtures. The files follow the
checklist of shared/reference/lerobot.md section 7: features in column order with the five bookkeeping
columns last, PNG (or JPEG) bytes in struct<bytes, path> columns, fixed-size list columns for vectors,
the `huggingface` schema metadata lerobot needs to decode images, row groups of 100 rows when there
are images, per-episode stats in meta/episodes_stats.jsonl, timestamps = frame_index / fps.
"""

import io
import json
import math
import pathlib
import shutil
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from eqx_energy.data import _format

Frames = Mapping[str, np.ndarray]


def _infer_feature(name: str, value: np.ndarray) -> dict[str, Any]:
    """(T, H, W, 3) uint8 -> image; (T, N) -> vector [N]; (T,) -> scalar [1]."""
    if "/" in name:
        raise ValueError(f"feature name {name!r} contains '/', which LeRobot rejects; use '.' or '_'")
    if value.ndim == 4:
        if value.dtype != np.uint8 or value.shape[-1] != 3:
            raise ValueError(f"image feature {name!r} must be uint8 (T, H, W, 3); got {value.dtype} {value.shape}")
        return {"dtype": "image", "shape": list(value.shape[1:]), "names": ["height", "width", "channel"]}
    if value.ndim == 2:
        return {"dtype": value.dtype.name, "shape": [value.shape[1]], "names": [name]}
    if value.ndim == 1:
        return {"dtype": value.dtype.name, "shape": [1], "names": None}
    raise ValueError(f"feature {name!r} has per-episode shape {value.shape}; expected (T,), (T, N) or (T, H, W, 3)")


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _stats(spec: Mapping[str, Any], value: np.ndarray) -> dict[str, list]:
    """LeRobot per-episode stats: min/max/mean/std (population) per dim; images per channel in [0, 1]."""
    if spec["dtype"] == "image":
        x = value.astype(np.float64).reshape(-1, value.shape[-1]) / 255.0
        chan = lambda v: [[[float(c)]] for c in v]  # noqa: E731  (3, 1, 1)
        return {"min": chan(x.min(0)), "max": chan(x.max(0)), "mean": chan(x.mean(0)),
                "std": chan(x.std(0)), "count": [len(value)]}
    x = value.reshape(len(value), -1)
    moments = x.astype(np.float64)
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": moments.mean(0).tolist(),
            "std": moments.std(0).tolist(), "count": [len(value)]}


class LeRobotWriter:
    """Streams episodes into a new LeRobot v2.1 dataset directory.

    The features are inferred from the first episode: uint8 (T, H, W, 3) arrays are cameras, (T, N)
    arrays vectors, (T,) arrays scalars; every later episode must match them. Use as a context manager
    (meta/ is written on a clean exit) or call `finish()`.
    """

    def __init__(
        self,
        root: str | pathlib.Path,
        *,
        fps: int,
        robot_type: str | None = None,
        image_format: Literal["png", "jpeg"] = "png",
        overwrite: bool = False,
    ):
        self.root = pathlib.Path(root)
        if not isinstance(fps, int) or fps <= 0:
            raise ValueError(f"fps must be a positive int (LeRobot v2.x stores it as int); got {fps!r}")
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg'; got {image_format!r}")
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise ValueError(f"dataset directory {self.root} is not empty; pass overwrite=True to replace it")
            if not (self.root / "meta").is_dir() and not (self.root / "data").is_dir():
                raise ValueError(f"refusing to overwrite {self.root}: it does not look like a LeRobot dataset")
            shutil.rmtree(self.root)
        self.fps, self.robot_type, self.image_format = fps, robot_type, image_format
        self.features: dict[str, dict[str, Any]] | None = None
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict[str, Any]] = []
        self.episode_stats: list[dict[str, Any]] = []
        self.total_frames = 0
        self._info = {"chunks_size": _format.CHUNKS_SIZE, "data_path": _format.DATA_PATH}

    def __enter__(self) -> "LeRobotWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()

    def add_episode(self, frames: Frames, task: str) -> int:
        """Write one episode (arrays with a leading time axis T) with its task string; returns its index."""
        frames = {k: np.asarray(v) for k, v in frames.items()}
        lengths = {k: len(v) for k, v in frames.items()}
        if not frames or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ValueError(f"an episode needs arrays with one common, non-zero length T; got lengths {lengths}")
        clash = set(frames) & set(_format.DEFAULT_FEATURES)
        if clash:
            raise ValueError(f"{sorted(clash)} are written by the writer itself; remove them from the episode")
        if self.features is None:
            self.features = {k: _infer_feature(k, v) for k, v in frames.items()}
        expected = {k: _infer_feature(k, v) for k, v in frames.items()}
        if expected != self.features:
            raise ValueError(f"episode {len(self.episodes)} features {expected} differ from the first "
                             f"episode's {self.features}; every episode needs the same keys, dtypes and shapes")
        index = len(self.episodes)
        length = next(iter(lengths.values()))
        task_index = self.tasks.setdefault(task, len(self.tasks))
        frame_index = np.arange(length, dtype=np.int64)
        columns = dict(frames)
        columns["timestamp"] = (frame_index / self.fps).astype(np.float32)
        columns["frame_index"] = frame_index
        columns["episode_index"] = np.full(length, index, np.int64)
        columns["index"] = self.total_frames + frame_index
        columns["task_index"] = np.full(length, task_index, np.int64)
        specs = {**self.features, **_format.DEFAULT_FEATURES}

        arrays = []
        for name, spec in specs.items():
            value = columns[name]
            if spec["dtype"] == "image":
                cells = [{"bytes": _encode(im, self.image_format), "path": f"frame_{i:06d}.{self.image_format}"}
                         for i, im in enumerate(value)]
                arrays.append(pa.array(cells, type=_format.IMAGE_STRUCT))
            elif spec["shape"] == [1]:
                arrays.append(pa.array(value, type=_format.arrow_type(spec)))
            else:
                flat = pa.array(np.ascontiguousarray(value).reshape(-1))
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, type=_format.arrow_type(spec)))
        hf = {"info": {"features": {n: _format.hf_feature(s) for n, s in specs.items()}}}
        schema = pa.schema([pa.field(n, a.type) for n, a in zip(specs, arrays)],
                           metadata={b"huggingface": json.dumps(hf).encode()})
        path = _format.episode_file(self.root, self._info, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        has_images = any(s["dtype"] == "image" for s in specs.values())
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path,
                       row_group_size=100 if has_images else 1000)

        self.episodes.append({"episode_index": index, "tasks": [task], "length": length})
        self.episode_stats.append({"episode_index": index,
                                   "stats": {n: _stats(s, columns[n]) for n, s in specs.items()
                                             if s["dtype"] != "string"}})
        self.total_frames += length
        return index

    def finish(self) -> pathlib.Path:
        """Write meta/info.json, tasks.jsonl, episodes.jsonl, episodes_stats.jsonl; returns the root."""
        if self.features is None:
            raise ValueError(f"no episodes were added to {self.root}; a LeRobot dataset needs at least one")
        meta = self.root / "meta"
        meta.mkdir(parents=True, exist_ok=True)
        n = len(self.episodes)
        info = {
            "codebase_version": _format.CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": n,
            "total_frames": self.total_frames,
            "total_tasks": len(self.tasks),
            "total_videos": 0,
            "total_chunks": math.ceil(n / _format.CHUNKS_SIZE),
            "chunks_size": _format.CHUNKS_SIZE,
            "fps": self.fps,
            "splits": {"train": f"0:{n}"},
            "data_path": _format.DATA_PATH,
            "video_path": None,
            "features": {**self.features, **_format.DEFAULT_FEATURES},
        }
        (meta / "info.json").write_text(json.dumps(info, indent=4, ensure_ascii=False), encoding="utf-8")
        _format.write_jsonl(meta / "tasks.jsonl", [{"task_index": i, "task": t} for t, i in self.tasks.items()])
        _format.write_jsonl(meta / "episodes.jsonl", self.episodes)
        _format.write_jsonl(meta / "episodes_stats.jsonl", self.episode_stats)
        return self.root


def write_lerobot_dataset(
    root: str | pathlib.Path,
    episodes: Iterable[tuple[Frames, str]],
    *,
    fps: int,
    robot_type: str | None = None,
    image_format: Literal["png", "jpeg"] = "png",
    overwrite: bool = False,
) -> pathlib.Path:
    """Write (frames, task) pairs as a LeRobot v2.1 dataset; `episodes` may be a generator."""
    with LeRobotWriter(root, fps=fps, robot_type=robot_type, image_format=image_format,
                       overwrite=overwrite) as writer:
        for frames, task in episodes:
            writer.add_episode(frames, task)
    return writer.root
