"""Frames/s of the data pipeline at LIBERO shapes vs a naive single-threaded pyarrow + PIL loop.

Dataset: written by our LeRobotWriter into a temp dir, LIBERO shapes (image + wrist_image 256x256 PNG,
state 8, actions 7), smooth synthetic frames. Both paths read the same shuffled frames and apply the
same pi0_libero transform chain (action chunk H=50, DeltaActions, z-score, resize to 224, [-1, 1],
tokenize, pad to 32) and stack batches of 32:
  pipeline: LeRobotSource (episode cache, row-group reads) + grain (threads prefetch, 0 workers);
  naive:    per frame pq.read_table(episode file) -> PIL decode -> chunk -> transforms; np.stack.
Demand of training: a step that consumes `batch` frames every `step_seconds` needs batch / step_seconds
frames/s; the script prints the shortest step time the pipeline keeps up with. Medians of 5 repeats
after a warm-up. Ends with one JSON line.

Usage: python benchmarks/data.py [--episodes 8] [--length 60] [--batch 32] [--step-seconds S]
"""

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from eqx_energy.data.norm_stats import compute_norm_stats
from eqx_energy.data.pipeline import make_pipeline
from eqx_energy.data.source import LeRobotSource
from eqx_energy.data.transforms import Compose, DeltaActions, make_bool_mask, policy_transforms
from eqx_energy.data.writer import write_lerobot_dataset
from eqx_energy.policy.tokenizer import PaligemmaTokenizer, train_sentencepiece

HORIZON = 50
PROMPTS = ("put the black bowl on the plate", "open the top drawer of the cabinet")


def write_dataset(root: Path, episodes: int, length: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]

    def episode(i):
        t = np.arange(length)[:, None, None, None]
        base = ((xx + yy)[None, :, :, None] // 2 + 3 * t + rng.integers(0, 256, 3)) % 256
        wrist = ((xx * 2 - yy)[None, :, :, None] // 3 + 5 * t + rng.integers(0, 256, 3)) % 256
        return ({"image": base.astype(np.uint8), "wrist_image": wrist.astype(np.uint8),
                 "state": rng.normal(size=(length, 8)).astype(np.float32),
                 "actions": rng.normal(size=(length, 7)).astype(np.float32)}, PROMPTS[i % 2])

    write_lerobot_dataset(root, (episode(i) for i in range(episodes)), fps=10, robot_type="panda")


def naive_batches(root: Path, info: dict, indices: np.ndarray, lengths: np.ndarray, tasks: dict, transform,
                  batch: int):
    """The straightforward loop: read the frame's episode file, decode, chunk, transform, stack."""
    ends = np.cumsum(lengths)
    examples = []
    for index in indices:
        episode = int(np.searchsorted(ends, index, side="right"))
        row = int(index - (ends[episode - 1] if episode else 0))
        table = pq.read_table(root / info["data_path"].format(episode_chunk=0, episode_index=episode))
        decode = lambda key: np.asarray(Image.open(io.BytesIO(table[key][row].as_py()["bytes"])))  # noqa: E731
        actions = np.asarray(table["actions"].to_pylist(), np.float32)
        steps = row + np.arange(HORIZON)
        example = {"image": decode("image"), "wrist_image": decode("wrist_image"),
                   "state": np.asarray(table["state"][row].as_py(), np.float32),
                   "actions": actions[np.minimum(steps, len(actions) - 1)], "action_valid": steps < len(actions),
                   "prompt": tasks[table["task_index"][row].as_py()]}
        examples.append(transform(example))
        if len(examples) == batch:
            yield {k: (np.stack([e[k] for e in examples]) if not isinstance(examples[0][k], dict) else
                       {c: np.stack([e[k][c] for e in examples]) for c in examples[0][k]}) for k in examples[0]}
            examples = []


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--length", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="batches per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step-seconds", type=float, default=None, help="a training step time to compare against")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "libero_like"
        start = time.perf_counter()
        write_dataset(root, a.episodes, a.length)
        write_s = time.perf_counter() - start
        tokenizer = PaligemmaTokenizer(train_sentencepiece(list(PROMPTS) * 20, Path(tmp) / "tok.model", 64), 48)
        delta = DeltaActions(make_bool_mask(6, -1))
        stats_source = LeRobotSource(root, HORIZON, images=False)
        stats = compute_norm_stats(delta(stats_source[i]) for i in range(len(stats_source)))
        transform = Compose(policy_transforms(norm_stats=stats, tokenizer=tokenizer, action_dim=7, delta_dims=6).inputs)
        source = LeRobotSource(root, HORIZON)
        frames = a.batch * a.batches

        def run_pipeline(threads):
            state = {"it": None}

            def fn():  # continue one stream, as training does; a fresh iterator would re-pay thread start-up
                if state["it"] is None:
                    state["it"] = iter(make_pipeline(source, transform, batch_size=a.batch, seed=0, threads=threads))
                for _ in range(a.batches):
                    next(state["it"])
            return fn

        order = np.random.default_rng(0).permutation(len(source))
        cursor = {"at": 0}

        def run_naive():
            idx = np.resize(np.roll(order, -cursor["at"]), frames)
            cursor["at"] = (cursor["at"] + frames) % len(order)
            for _ in naive_batches(root, source.info, idx, source.lengths, source.tasks, transform, a.batch):
                pass

        results = {name: frames / statistics.median(timed(fn, a.repeats)) for name, fn in
                   (("pipeline", run_pipeline(2)), ("pipeline_no_threads", run_pipeline(0)), ("naive", run_naive))}
    speedup = results["pipeline"] / results["naive"]
    keep_up = a.batch / results["pipeline"]
    print(f"dataset: {a.episodes} episodes x {a.length} frames, 2 x 256x256 PNG, written in {write_s:.1f} s")
    for name, fps in results.items():
        print(f"{name:>20}: {fps:8.1f} frames/s")
    print(f"pipeline / naive: {speedup:.2f}x; keeps up with any train step slower than {keep_up:.2f} s "
          f"at batch {a.batch}")
    out = {"bench": "data", "frames_per_s": {k: round(v, 1) for k, v in results.items()},
           "speedup_vs_naive": round(speedup, 2), "min_step_seconds_at_batch": round(keep_up, 3),
           "batch": a.batch, "horizon": HORIZON}
    if a.step_seconds:
        out["pipeline_over_demand"] = round(results["pipeline"] / (a.batch / a.step_seconds), 2)
        print(f"demand at {a.step_seconds} s/step: {a.batch / a.step_seconds:.1f} frames/s -> "
              f"{out['pipeline_over_demand']}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
