"""grain pipeline: batches, seeded epochs, sharding, and exact resume from the iterator state."""

import numpy as np
import pytest

from eqx_energy.data.pipeline import make_pipeline
from eqx_energy.data.source import LeRobotSource
from eqx_energy.data.writer import write_lerobot_dataset

LENGTHS = (9, 14, 6, 11)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    rng = np.random.default_rng(0)
    episodes = [({"image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                  "state": rng.normal(size=(n, 4)).astype(np.float32),
                  "actions": rng.normal(size=(n, 2)).astype(np.float32)}, f"task {i % 2}")
                for i, n in enumerate(LENGTHS)]
    write_lerobot_dataset(root, episodes, fps=10)
    return root


def frame_ids(batch):
    return list(zip(batch["episode_index"].tolist(), batch["frame_index"].tolist()))


def scale_state(x):
    return {**x, "state": x["state"] * 2}


def test_batches_and_epochs(root):
    source = LeRobotSource(root, 3)
    it = iter(make_pipeline(source, scale_state, batch_size=5, seed=0, num_epochs=2))
    batches = list(it)
    assert len(batches) == 2 * sum(LENGTHS) // 5  # the stream crosses the epoch boundary; the tail is dropped
    first = batches[0]
    assert first["image"].shape == (5, 8, 8, 3) and first["actions"].shape == (5, 3, 2)
    assert first["action_valid"].dtype == bool and first["prompt"].shape == (5,)
    ids = [i for b in batches for i in frame_ids(b)]
    epoch0, epoch1 = ids[: sum(LENGTHS)], ids[sum(LENGTHS):]
    assert len(set(epoch0)) == sum(LENGTHS)  # an epoch is a permutation of all frames
    assert epoch0 != sorted(epoch0) and epoch0[: len(epoch1)] != epoch1  # shuffled, differently per epoch
    again = [i for b in make_pipeline(source, scale_state, batch_size=5, seed=0, num_epochs=2) for i in frame_ids(b)]
    assert again == ids


def test_transform_is_applied(root):
    source = LeRobotSource(root, 3)
    batch = next(iter(make_pipeline(source, scale_state, batch_size=4, seed=1, shuffle=False)))
    np.testing.assert_array_equal(batch["state"], 2 * np.stack([source[i]["state"] for i in range(4)]))


class Recorded:
    """A source that records which frames were read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.read.append(index)
        return self.source[index]


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_stack_to_the_single_process_batches(root, count):
    """Multi-host: process i's batches are rows [i b, (i+1) b) of the one-process batches, it reads only
    those frames, and its iterator state moves to any process count (one global batch position)."""
    def pipeline(source, index, shards):
        return make_pipeline(source, None, batch_size=8, seed=3, num_epochs=2, shard_index=index,
                             shard_count=shards, threads=0)

    whole = [frame_ids(b) for b in pipeline(LeRobotSource(root, 3), 0, 1)]
    assert len(whole) == 2 * sum(LENGTHS) // 8
    sources = [Recorded(LeRobotSource(root, 3)) for _ in range(count)]
    shards = [[frame_ids(b) for b in pipeline(sources[i], i, count)] for i in range(count)]
    assert [sum(rows, []) for rows in zip(*shards, strict=True)] == whole
    for source, batches in zip(sources, shards, strict=True):
        read = [source.source[i] for i in source.read]
        assert sorted((int(x["episode_index"]), int(x["frame_index"])) for x in read) == sorted(sum(batches, []))

    it = iter(pipeline(LeRobotSource(root, 3), count - 1, count))
    for _ in range(3):
        next(it)
    resumed = iter(pipeline(LeRobotSource(root, 3), 0, 1))
    resumed.set_state(it.get_state())
    assert frame_ids(next(resumed)) == whole[3]


@pytest.mark.parametrize("threads", [0, 2])
def test_restore_continues_the_exact_batch_sequence(root, threads):
    def pipeline():
        return make_pipeline(LeRobotSource(root, 3), scale_state, batch_size=6, seed=11, threads=threads)

    it = iter(pipeline())
    for _ in range(5):  # crosses an epoch boundary (40 frames / 6)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(9)]
    resumed = iter(pipeline())
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(9)]):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_bad_arguments(root):
    source = LeRobotSource(root, 3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_pipeline(source, None, batch_size=100, seed=0)
    with pytest.raises(ValueError, match="shard_index"):
        make_pipeline(source, None, batch_size=2, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="must divide by the 4 processes"):
        make_pipeline(source, None, batch_size=6, seed=0, shard_index=1, shard_count=4)
