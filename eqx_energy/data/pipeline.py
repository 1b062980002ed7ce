"""The grain pipeline: shard by process -> seeded shuffle per epoch -> transform -> batch -> prefetch.

Batches are dicts (nested like the examples) of numpy arrays with a leading batch axis. The stream of
frames runs across epoch boundaries (each epoch a new permutation); with a finite num_epochs the last
incomplete batch is dropped. `iter(pipeline)` is a grain DatasetIterator: `get_state()`
/ `set_state(state)` restore it so that it continues the exact sequence of batches (orbax saves it with
`grain.checkpoint.CheckpointSave(iterator)`). Workers: 0 by default, because on a 2-core machine
worker processes cost more than they return (reference/stack.md section 6); threads still prefetch.
"""

import logging
from collections.abc import Callable
from typing import Any

import grain

logger = logging.getLogger(__name__)


def _enable_worker_processes() -> None:
    """grain 0.2.18 workers read absl flags before anything parses them (google/grain#1355)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pipeline(
    source: Any,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    workers: int = 0,
    threads: int = 2,
    prefetch: int = 4,
) -> grain.IterDataset:
    """A grain IterDataset of batches over a random-access `source` (e.g. LeRobotSource).

    Process `shard_index` of `shard_count` reads frames shard_index, shard_index + shard_count, ... (the
    len % shard_count last frames are left out, so every process sees as many);
    `batch_size` is per process. Each epoch is a new seeded permutation; num_epochs=None repeats forever.
    `threads` decode/transform `prefetch` batches ahead; `workers` > 0 moves that into processes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}); got {shard_index}")
    frames = len(source) // shard_count
    if frames < batch_size:
        raise ValueError(f"{source!r} gives {frames} frames per shard ({shard_count} shards), fewer than one batch "
                         f"of {batch_size}; lower batch_size or add data")
    dataset = grain.MapDataset.source(source)[: frames * shard_count][shard_index::shard_count]  # equal shards
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)
    if transform is not None:
        dataset = dataset.map(transform)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch * batch_size))
    if workers > 0:
        _enable_worker_processes()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    logger.info("data pipeline: %s, %d frames per shard, batch %d, shard %d/%d, workers %d", source, frames,
                batch_size, shard_index, shard_count, workers)
    return iterable

