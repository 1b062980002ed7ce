"""Load a trained run for inference: `load_run(run_dir or run_dir/checkpoints/STEP) -> LoadedRun`.

    run = load_run("runs/demo")                  # latest step
    run = load_run("runs/demo/checkpoints/60")   # that step
    run.model        # RunModel(policy, energy) with the trained (EMA, when the run keeps one) params
    run.transforms   # the run's input/output transforms (norm stats + tokenizer of the run)

The model is built as training built it (`build_model`: openpi weights for the policy when the config
names a checkpoint, else a fresh init), then the run's trainable leaves are restored over it; in
energy_only mode the frozen policy is cast to `policy.frozen_dtype`, as in training. Nothing needs the
dataset: the tokenizer and norm stats come from the run dir (or the paths its config names).
Errors (CheckpointError) name the path and what to pass instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax

from eqx_energy.checkpoints.run import CheckpointError, RunCheckpoints, abstract
from eqx_energy.data.norm_stats import NormStats, load_norm_stats
from eqx_energy.data.transforms import Group
from eqx_energy.policy.tokenizer import PaligemmaTokenizer
from eqx_energy.train.config import TrainConfig, load_config
from eqx_energy.train.loop import NORM_STATS_FILE, TOKENIZER_FILE, build_model, run_transforms
from eqx_energy.train.model import RunModel, cast_frozen, trainable_spec
from eqx_energy.train.optim import group_labels, make_optimizer

CONFIG_FILE = "config.yaml"


class LoadedRun(NamedTuple):
    cfg: TrainConfig
    model: RunModel  # trained params (EMA when present), inference-ready
    transforms: Group  # .inputs: raw example -> model layout; .outputs: model actions -> env actions
    norm_stats: dict[str, NormStats]
    run_dir: Path
    step: int
    ema: bool  # whether the EMA params were loaded


def resolve_run(path: str | os.PathLike) -> tuple[Path, int | None]:
    """(run dir, step or None for the latest) from a run dir or one of its `checkpoints/<step>` dirs."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--ckpt {path} does not exist; pass a run dir (runs/NAME) or runs/NAME/checkpoints/STEP")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if (path / CONFIG_FILE).is_file():
        return path, None
    raise CheckpointError(
        f"--ckpt {path} is neither a run dir (no {CONFIG_FILE}) nor a run's checkpoints/<step> dir; "
        "pass the directory train.py wrote (--run-dir), or one of its checkpoints/<step> subdirectories"
    )


def _asset(configured: str | None, run_dir: Path, name: str, what: str) -> Path:
    path = Path(configured) if configured else run_dir / name
    if not path.exists():
        raise CheckpointError(f"the run's {what} {path} is missing; the run dir {run_dir} is incomplete")
    return path


def load_run(path: str | os.PathLike, *, use_ema: bool = True) -> LoadedRun:
    """Config, trained model, transforms and norm stats of a run (see the module docstring)."""
    run_dir, step = resolve_run(path)
    cfg = load_config(TrainConfig, run_dir / CONFIG_FILE)
    stats = load_norm_stats(_asset(cfg.data.norm_stats, run_dir, NORM_STATS_FILE, "norm stats"))
    tokenizer = PaligemmaTokenizer(
        _asset(cfg.policy.tokenizer, run_dir, TOKENIZER_FILE, "tokenizer"), max_len=cfg.policy.model.max_token_len
    )
    model = build_model(cfg, jax.random.key(cfg.train.seed))
    trainable, frozen = eqx.partition(model, trainable_spec(model, cfg.train.mode))
    if cfg.train.mode == "energy_only":
        frozen = cast_frozen(frozen, cfg.policy.frozen_dtype)
    params = eqx.filter(trainable, eqx.is_inexact_array)
    optimizer = make_optimizer(
        cfg.optim, group_labels(params), total_steps=cfg.train.steps, energy_warm_steps=cfg.train.energy_warm_steps
    )
    opt_template = eqx.filter_eval_shape(optimizer.init, params)
    has_ema = cfg.optim.ema_decay is not None and use_ema
    checkpoints = RunCheckpoints(run_dir)
    try:
        restored = checkpoints.restore(
            step, params=abstract(params), opt_state=opt_template, ema=abstract(params) if has_ema else None
        )
    finally:
        checkpoints.close()
    trained = restored.ema if has_ema else restored.params
    model = eqx.nn.inference_mode(eqx.combine(trained, frozen))
    return LoadedRun(cfg, model, run_transforms(cfg, tokenizer, stats), stats, run_dir, restored.step, has_ema)
