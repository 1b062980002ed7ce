"""The LeRobot v2.x on-disk format, shared by the writer and the reader.

Layout: meta/info.json (schema + counts), meta/tasks.jsonl, meta/episodes.jsonl, one parquet file per
episode at `data_path.format(episode_chunk=e // chunks_size, episode_index=e)`. A feature spec is
`{"dtype", "shape", "names"}`; dtype is a numpy dtype name, "image" (PNG/JPEG bytes in a
struct<bytes, path> column), "string", or "video" (no column; not supported here). Shape [1] means a
scalar column, [N] a fixed-size list column. See shared/reference/lerobot.md.
"""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

CODEBASE_VERSION = "v2.1"
READABLE_VERSIONS = ("v2.0", "v2.1")
CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def episode_file(root: pathlib.Path, info: Mapping[str, Any], episode_index: int) -> pathlib.Path:
    """The parquet path of an episode, from info.json's `data_path` template and `chunks_size`."""
    chunk = episode_index // int(info["chunks_size"])
    return root / info["data_path"].format(episode_chunk=chunk, episode_index=episode_index)


def arrow_type(spec: Mapping[str, Any]) -> pa.DataType:
    """The arrow type the writer uses for a feature spec (the reader also accepts list<x> for [N])."""
    dtype, shape = spec["dtype"], list(spec["shape"])
    if dtype == "image":
        return IMAGE_STRUCT
    if dtype == "string":
        return pa.string()
    scalar = pa.from_numpy_dtype(np.dtype(dtype))
    if shape == [1]:
        return scalar
    if len(shape) != 1:
        raise ValueError(f"feature shape {shape} is not supported: use [1] for scalars or [N] for vectors")
    return pa.list_(pa.field("element", scalar), shape[0])


def hf_feature(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The Hugging Face `datasets` feature spec lerobot needs in the parquet schema metadata."""
    if spec["dtype"] == "image":
        return {"_type": "Image"}
    if spec["dtype"] == "string":
        return {"dtype": "string", "_type": "Value"}
    value = {"dtype": spec["dtype"], "_type": "Value"}
    if list(spec["shape"]) == [1]:
        return value
    return {"feature": value, "length": spec["shape"][0], "_type": "Sequence"}


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """One JSON object per non-empty line; a bad line raises ValueError naming file and line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err}); the file is corrupt") from err
    return rows


def write_jsonl(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
