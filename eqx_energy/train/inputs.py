"""A run's data side, shared by training and inference: the files a run dir keeps beside its
checkpoints (tokenizer, norm stats, held-out episodes), the transform chain built from them, and the
arrays the model reads.

    source, transforms, stats = build_inputs(cfg, run_dir)        # training: may create the files
    transforms = run_transforms(cfg, tokenizer, stats)             # inference: from the kept files
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from eqx_energy.data.norm_stats import NormStats, compute_norm_stats, load_norm_stats, save_norm_stats
from eqx_energy.data.source import LeRobotSource
from eqx_energy.data.transforms import Compose, DeltaActions, Group, LiberoInputs, make_bool_mask, policy_transforms
from eqx_energy.policy.tokenizer import PaligemmaTokenizer, train_sentencepiece
from eqx_energy.train.config import TrainConfig

MODEL_INPUT_KEYS = ("image", "image_mask", "state", "tokenized_prompt", "tokenized_prompt_mask", "actions")
CONFIG_COPY_FILE = "config.yaml"  # a readable copy of the latest invocation's config; checkpoints hold the record
TOKENIZER_FILE = "tokenizer.model"
NORM_STATS_FILE = "norm_stats.json"
HOLDOUT_FILE = "holdout_episodes.json"


def _tokenizer(cfg: TrainConfig, source: LeRobotSource, run_dir: Path) -> PaligemmaTokenizer:
    """The configured sentencepiece model, or one trained on the dataset's task strings (kept in the run)."""
    path = Path(cfg.policy.tokenizer) if cfg.policy.tokenizer else run_dir / TOKENIZER_FILE
    if not path.exists():
        train_sentencepiece(list(source.tasks.values()), path, vocab_size=cfg.policy.model.vocab_size,
                            state_pieces=cfg.data.discrete_state and cfg.policy.model.vocab_size >= 512)
    return PaligemmaTokenizer(path, max_len=cfg.policy.model.max_token_len)


def _norm_stats(cfg: TrainConfig, run_dir: Path) -> dict[str, NormStats]:
    """Configured stats, else the run's own, else computed over the training split (after delta actions;
    read without images, which the stats never use)."""
    if cfg.data.norm_stats:
        return load_norm_stats(cfg.data.norm_stats)
    path = run_dir / NORM_STATS_FILE
    if path.exists():
        return load_norm_stats(path)
    steps = [lambda x: {"state": np.asarray(x[cfg.data.state_key]), "actions": np.asarray(x["actions"])}]
    if cfg.data.delta_dims:
        mask = make_bool_mask(cfg.data.delta_dims, -(cfg.data.action_dim - cfg.data.delta_dims))
        steps.append(DeltaActions(mask))
    stats_source = LeRobotSource(
        cfg.data.root, cfg.policy.model.action_horizon, split="train", images=False,
        holdout_fraction=cfg.data.holdout_fraction, holdout_seed=cfg.data.holdout_seed,
    )
    stats = compute_norm_stats((Compose(tuple(steps))(stats_source[i]) for i in range(len(stats_source))))
    save_norm_stats(stats, path)
    return stats


def build_inputs(cfg: TrainConfig, run_dir: Path, *, split: str = "train"):
    """(source, transforms Group, norm stats) of the run's dataset split."""
    source = LeRobotSource(
        cfg.data.root, cfg.policy.model.action_horizon, split=split, images=cfg.data.image_key is not None,
        holdout_fraction=cfg.data.holdout_fraction, holdout_seed=cfg.data.holdout_seed,
    )
    stats = _norm_stats(cfg, run_dir)
    return source, run_transforms(cfg, _tokenizer(cfg, source, run_dir), stats), stats


def run_transforms(cfg: TrainConfig, tokenizer: PaligemmaTokenizer, stats: dict[str, NormStats]) -> Group:
    """The run's transform chain: openpi's LIBERO inputs/outputs with the run's keys and sizes."""
    return policy_transforms(
        norm_stats=stats,
        tokenizer=tokenizer,
        action_dim=cfg.data.action_dim,
        pi05=cfg.policy.model.pi05,
        delta_dims=cfg.data.delta_dims,
        image_size=cfg.policy.model.image_resolution,
        model_action_dim=cfg.policy.model.action_dim,
        discrete_state=cfg.data.discrete_state,
        use_quantiles=cfg.data.quantile_norm,
        keys=LiberoInputs(base_key=cfg.data.image_key, wrist_key=cfg.data.wrist_key, state_key=cfg.data.state_key),
    )


def model_inputs(example: dict[str, Any]) -> dict[str, Any]:
    """Only the arrays the train step reads (drops strings and bookkeeping; a state-only run has no images)."""
    return {k: example[k] for k in MODEL_INPUT_KEYS if k in example}
