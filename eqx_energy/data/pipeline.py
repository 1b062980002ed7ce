"""The grain pipeline: seeded shuffle per epoch -> transform -> batch -> this process's rows -> prefetch.

Batches are dicts (nested like the examples) of numpy arrays with a leading batch axis. The stream of
frames runs across epoch boundaries (each epoch a new permutation); with a finite num_epochs the last
incomplete batch is dropped. Several processes (multi-host training) share one global sequence of
batches and each reads only its block of rows of every batch, so the examples a step sees, and their
order, do not depend on the number of processes. `iter(pipeline)` is a grain DatasetIterator: `get_state()`
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

    `batch_size` is the global batch. Process `shard_index` of `shard_count` gets rows
    [shard_index * b, (shard_index + 1) * b) of every global batch, b = batch_size / shard_count, and
    reads (decodes, transforms) only those frames: the processes' batches stacked in process order
    are the batch one process would get. The iterator's state counts global batches, the same in
    every process. Each epoch is a new seeded permutation; num_epochs=None repeats forever.
    `threads` decode/transform `prefetch` batches ahead; `workers` > 0 moves that into processes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}); got {shard_index}")
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} (the global batch) must divide by the {shard_count} processes; "
                         f"set data.batch_size to a multiple of {shard_count}")
    if len(source) < batch_size:
        raise ValueError(f"{source!r} has {len(source)} frames, fewer than one batch of {batch_size}; "
                         "lower batch_size or add data")
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)
    if transform is not None:
        dataset = dataset.map(transform)
    local = batch_size // shard_count
    dataset = dataset.batch(local, drop_remainder=True)  # global batch g = local batches g * shard_count + i
    whole = len(dataset) // shard_count * shard_count  # drops an incomplete last global batch
    dataset = dataset[:whole][shard_index::shard_count]  # lazy: the other rows are never read
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    if workers > 0:
        _enable_worker_processes()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    logger.info("data pipeline: %s, %d frames, global batch %d, rows %d:%d on process %d/%d, workers %d", source,
                len(source), batch_size, shard_index * local, (shard_index + 1) * local, shard_index, shard_count,
                workers)
    return iterable

