"""LeRobotSource and LeRobotWriter on real files: every reading path, chunking, holdout, clear errors."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eqx_energy.data.source import LeRobotSource, holdout_episodes
from eqx_energy.data.writer import LeRobotWriter, write_lerobot_dataset

LENGTHS = (7, 12, 5)
TASKS = ("put the bowl on the plate", "open the drawer", "put the bowl on the plate")


def libero_episode(rng: np.random.Generator, length: int, size: int = 256) -> dict[str, np.ndarray]:
    """LIBERO shapes: image + wrist_image (size, size, 3) uint8, state 8, actions 7 (smooth images, like camera frames)."""
    yy, xx = np.mgrid[:size, :size]
    offsets = rng.integers(0, 256, (2, length, 1, 1, 3))
    ramp = (xx + 2 * yy)[None, :, :, None]
    return {
        "image": ((ramp + offsets[0]) % 256).astype(np.uint8),
        "wrist_image": ((ramp.transpose(0, 2, 1, 3) + offsets[1]) % 256).astype(np.uint8),
        "state": rng.normal(size=(length, 8)).astype(np.float32),
        "actions": rng.normal(size=(length, 7)).astype(np.float32),
    }


def write_libero(root, lengths=LENGTHS, size=256, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    episodes = [libero_episode(rng, n, size) for n in lengths]
    write_lerobot_dataset(root, zip(episodes, TASKS[: len(lengths)]), fps=10, robot_type="panda", **kwargs)
    return episodes


@pytest.fixture(scope="module")
def libero(tmp_path_factory):
    root = tmp_path_factory.mktemp("libero")
    return root, write_libero(root)


def expected_chunk(actions: np.ndarray, t: int, horizon: int):
    steps = t + np.arange(horizon)
    return actions[np.minimum(steps, len(actions) - 1)], steps < len(actions)


def test_every_frame_round_trips(libero):
    root, episodes = libero
    source = LeRobotSource(root, action_horizon=4)
    assert len(source) == sum(LENGTHS)
    index = 0
    for e, episode in enumerate(episodes):
        for t in range(len(episode["state"])):
            item = source[index]
            np.testing.assert_array_equal(item["image"], episode["image"][t])
            np.testing.assert_array_equal(item["wrist_image"], episode["wrist_image"][t])
            np.testing.assert_array_equal(item["state"], episode["state"][t])
            chunk, valid = expected_chunk(episode["actions"], t, 4)
            np.testing.assert_array_equal(item["actions"], chunk)
            np.testing.assert_array_equal(item["action_valid"], valid)
            assert item["prompt"] == TASKS[e]
            assert (item["episode_index"], item["frame_index"]) == (e, t)
            assert item["image"].dtype == np.uint8 and item["state"].dtype == np.float32
            index += 1


def test_chunk_padding_at_episode_end(libero):
    root, episodes = libero
    source = LeRobotSource(root, action_horizon=10)
    last = source[LENGTHS[0] - 2]  # second-to-last frame of episode 0
    np.testing.assert_array_equal(last["action_valid"], [True, True] + [False] * 8)
    np.testing.assert_array_equal(last["actions"][1:], np.repeat(episodes[0]["actions"][-1:], 9, axis=0))
    first_of_next = source[LENGTHS[0]]  # never crosses into episode 1's neighbour
    np.testing.assert_array_equal(first_of_next["actions"], episodes[1]["actions"][:10])
    assert first_of_next["action_valid"].all()


def test_files_follow_lerobot_v21(libero):
    root, _ = libero
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["total_frames"] == sum(LENGTHS) and info["total_tasks"] == 2
    assert list(info["features"])[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]
    table = pq.read_table(root / "data" / "chunk-000" / "episode_000001.parquet")
    np.testing.assert_array_equal(table["index"].to_numpy(), LENGTHS[0] + np.arange(LENGTHS[1]))
    np.testing.assert_allclose(table["timestamp"].to_numpy(), np.arange(LENGTHS[1]) / 10, rtol=1e-6)
    assert table.schema.field("state").type == pa.list_(pa.field("element", pa.float32()), 8)
    assert b"huggingface" in table.schema.metadata
    stats = [json.loads(line) for line in (root / "meta" / "episodes_stats.jsonl").read_text().splitlines()]
    assert np.asarray(stats[0]["stats"]["image"]["mean"]).shape == (3, 1, 1)
    tasks = [json.loads(line) for line in (root / "meta" / "tasks.jsonl").read_text().splitlines()]
    assert tasks == [{"task_index": 0, "task": TASKS[0]}, {"task_index": 1, "task": TASKS[1]}]


def test_jpeg_images(tmp_path):
    episodes = write_libero(tmp_path, lengths=(3,), size=64, image_format="jpeg")
    item = LeRobotSource(tmp_path, 2)[1]
    assert item["image"].shape == (64, 64, 3)
    assert np.abs(item["image"].astype(float) - episodes[0]["image"][1]).mean() < 8


def test_variable_length_list_columns_and_v20(tmp_path):
    """Other writers store vectors as list<float>; v2.0 datasets have meta/stats.json instead of episodes_stats."""
    episodes = write_libero(tmp_path, lengths=(4, 3), size=32)
    for path in sorted((tmp_path / "data").rglob("*.parquet")):
        table = pq.read_table(path)
        for name in ("state", "actions"):
            column = pa.ListArray.from_arrays(
                pa.array(np.arange(len(table) + 1, dtype=np.int32) * table[name].type.list_size),
                table[name].combine_chunks().flatten())
            table = table.set_column(table.schema.get_field_index(name), name, column)
        pq.write_table(table, path)
    info = json.loads((tmp_path / "meta" / "info.json").read_text())
    (tmp_path / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v2.0"}))
    (tmp_path / "meta" / "episodes_stats.jsonl").unlink()
    item = LeRobotSource(tmp_path, 2)[5]
    np.testing.assert_array_equal(item["state"], episodes[1]["state"][1])
    np.testing.assert_array_equal(item["actions"], episodes[1]["actions"][1:3])


def test_chunk_directories_follow_chunks_size(tmp_path):
    episodes = write_libero(tmp_path, size=16)
    info = json.loads((tmp_path / "meta" / "info.json").read_text())
    (tmp_path / "meta" / "info.json").write_text(json.dumps({**info, "chunks_size": 2, "total_chunks": 2}))
    (tmp_path / "data" / "chunk-001").mkdir()
    shutil.move(tmp_path / "data" / "chunk-000" / "episode_000002.parquet", tmp_path / "data" / "chunk-001")
    item = LeRobotSource(tmp_path, 3)[sum(LENGTHS) - 1]
    np.testing.assert_array_equal(item["state"], episodes[2]["state"][-1])


def test_holdout_split_by_episode(tmp_path):
    rng = np.random.default_rng(1)
    lengths = (2, 3, 2, 4, 2, 3, 2, 2, 3, 2)
    write_lerobot_dataset(tmp_path, [({"state": rng.normal(size=(n, 3)).astype(np.float32),
                                       "actions": rng.normal(size=(n, 2)).astype(np.float32)}, "task")
                                     for n in lengths], fps=5)
    held = holdout_episodes(len(lengths), 0.3, seed=7)
    assert len(held) == 3 and np.array_equal(held, holdout_episodes(len(lengths), 0.3, seed=7))
    assert not np.array_equal(held, holdout_episodes(len(lengths), 0.3, seed=8))
    train = LeRobotSource(tmp_path, 2, split="train", holdout_fraction=0.3, holdout_seed=7)
    test = LeRobotSource(tmp_path, 2, split="holdout", holdout_fraction=0.3, holdout_seed=7)
    train_eps = {int(train[i]["episode_index"]) for i in range(len(train))}
    test_eps = {int(test[i]["episode_index"]) for i in range(len(test))}
    assert test_eps == set(held.tolist()) and train_eps == set(range(10)) - test_eps
    assert len(train) + len(test) == sum(lengths)
    assert repr(train) == repr(LeRobotSource(tmp_path, 2, split="train", holdout_fraction=0.3, holdout_seed=7))


def test_images_can_be_skipped(libero):
    root, _ = libero
    item = LeRobotSource(root, 2, images=False)[0]
    assert "image" not in item and "wrist_image" not in item and item["state"].shape == (8,)


def test_truncated_parquet_is_a_clear_error(tmp_path):
    write_libero(tmp_path, size=16)
    path = tmp_path / "data" / "chunk-000" / "episode_000001.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    source = LeRobotSource(tmp_path, 2)  # episode 0 is intact
    source[0]
    with pytest.raises(ValueError, match="episode_000001.parquet.*truncated or corrupt"):
        source[LENGTHS[0]]
    first = tmp_path / "data" / "chunk-000" / "episode_000000.parquet"
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(ValueError, match="episode_000000.parquet.*truncated or corrupt"):
        LeRobotSource(tmp_path, 2)


def _edit_info(root, edit):
    path = root / "meta" / "info.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("edit, message", [
    (lambda i: i["features"]["state"].update(shape=[9]), "column 'state' has arrow type .*shape \\[9\\]"),
    (lambda i: i["features"].pop("wrist_image"), "has columns .* but meta/info.json declares"),
    (lambda i: i.update(codebase_version="v3.0"), "v3.0.* not supported"),
    (lambda i: i.update(total_frames=99), "total_frames=99"),
    (lambda i: i.pop("features"), "lacks required keys \\['features'\\]"),
    (lambda i: i["features"]["image"].update(dtype="video"), "stored as video"),
])
def test_wrong_info_json_is_a_clear_error(tmp_path, edit, message):
    write_libero(tmp_path, lengths=(2,), size=16)
    _edit_info(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        LeRobotSource(tmp_path, 2)


def test_missing_dataset_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="meta/info.json is missing"):
        LeRobotSource(tmp_path, 2)
    write_libero(tmp_path, lengths=(2,), size=16)
    with pytest.raises(ValueError, match="action_key 'action' is not a vector feature.*'actions'"):
        LeRobotSource(tmp_path, 2, action_key="action")
    with pytest.raises(ValueError, match="holdout fraction"):
        LeRobotSource(tmp_path, 2, split="train", holdout_fraction=1.0)


def test_writer_rejects_inconsistent_episodes(tmp_path):
    rng = np.random.default_rng(0)
    writer = LeRobotWriter(tmp_path / "d", fps=10)
    writer.add_episode(libero_episode(rng, 2, 16), "a")
    bad = libero_episode(rng, 2, 16)
    bad["state"] = bad["state"][:, :7]
    with pytest.raises(ValueError, match="differ from the first episode"):
        writer.add_episode(bad, "a")
    with pytest.raises(ValueError, match="one common, non-zero length"):
        writer.add_episode({"state": np.zeros((2, 8), np.float32), "actions": np.zeros((3, 7), np.float32)}, "a")
    writer.finish()
    with pytest.raises(ValueError, match="not empty; pass overwrite=True"):
        LeRobotWriter(tmp_path / "d", fps=10)
