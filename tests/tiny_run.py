"""A tiny trained run shared by the tests that need one (correct.py eval, the policy server).

Built once per test process by the session fixture `tiny_run` in conftest.py: training compiles
the train step, and every consumer then compiles sampling and correction against the same run.
"""

from pathlib import Path

import numpy as np

from eqx_energy.data.writer import write_lerobot_dataset
from eqx_energy.train.config import TrainConfig, from_dict
from eqx_energy.train.loop import run as train_run

TASKS = ("pick up the red block", "push the blue button", "open the top drawer", "close the left window")


def tiny_dataset(root: Path) -> Path:
    """6 episodes (60 frames, 4 tasks) of two 16 px cameras, 3-dim state and 2-dim actions."""
    rng = np.random.default_rng(0)
    episodes = [({"image": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                  "wrist_image": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                  "state": rng.normal(size=(n, 3)).astype(np.float32),
                  "actions": rng.normal(size=(n, 2)).astype(np.float32)}, TASKS[i % len(TASKS)])
                for i, n in enumerate((7, 9, 8, 6, 10, 7))]
    return write_lerobot_dataset(root, episodes, fps=10)


def tiny_config(data: Path, **train) -> TrainConfig:
    """A tiny Pi0 + energy on `data`, batch 8, trained 2 joint steps (EMA); `train` overrides train.*."""
    return from_dict(TrainConfig, {
        "policy": {"model": {"paligemma_variant": "tiny", "action_expert_variant": "tiny_expert",
                             "siglip_variant": "tiny", "action_horizon": 4, "max_token_len": 8,
                             "image_resolution": 16, "vocab_size": 48, "dtype": "float32", "action_dim": 8},
                   "frozen_dtype": None, "sample_steps": 2},
        "energy": {"context_dim": 64, "action_dim": 2, "hidden": 16, "num_heads": 2, "output": "softplus",
                   "max_horizon": 4, "action_input_norm": False},  # a LayerNorm over 2 dims leaves E ~flat in a
        "data": {"root": str(data), "action_dim": 2, "holdout_fraction": 0.34, "batch_size": 8},
        "optim": {"warmup_steps": 1, "ema_decay": 0.9},
        "train": {"mode": "joint", "steps": 2, "log_interval": 1, "checkpoint_interval": 2, "mesh": [-1, 1], **train},
    })


def make_tiny_run(tmp: Path) -> tuple:
    """(run dir, dataset dir): `tiny_config` on `tiny_dataset`, trained."""
    data = tiny_dataset(tmp / "data")
    return train_run(tiny_config(data), tmp / "run", progress=False), data
