"""Load a trained run for inference: `load_run(run_dir or run_dir/checkpoints/STEP) -> LoadedRun`.

    run = load_run("runs/demo")                  # latest step
    run = load_run("runs/demo/checkpoints/60")   # that step
    run.model        # RunModel(policy, energy) with the trained (EMA, when the run keeps one) params
    run.transforms   # the run's input/output transforms (norm stats + tokenizer of the run)

The config is the one saved in the checkpoint being loaded (the run's `config.yaml` is a readable copy
of the latest invocation; it is read only for a checkpoint without a saved config, with a warning).
The frozen half is built exactly as training built it (`train.model.init_model`: the same key
derivation, openpi weights for the policy when the config names a checkpoint, the policy's dtype
per mode), then the trainable leaves are read into their shardings: the EMA (or, with
`use_ema=False` or no EMA, the raw params) and nothing else; the optimizer state is never read. Nothing needs the dataset: the
tokenizer and norm stats come from the run dir (or the paths its config names). Errors
(CheckpointError) name the path and what to pass instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
from jax.sharding import Mesh

from eqx_energy.checkpoints.run import CheckpointError, RunCheckpoints, latest_step
from eqx_energy.data.norm_stats import NormStats, load_norm_stats
from eqx_energy.data.transforms import Group
from eqx_energy.policy.tokenizer import PaligemmaTokenizer
from eqx_energy.train.config import TrainConfig, from_dict, load_config
from eqx_energy.train.inputs import CONFIG_COPY_FILE, NORM_STATS_FILE, TOKENIZER_FILE, run_transforms
from eqx_energy.train.model import RunModel, init_model, is_inexact
from eqx_energy.train.sharding import make_mesh

logger = logging.getLogger(__name__)


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
    if latest_step(path) is not None:
        return path, None
    raise CheckpointError(
        f"--ckpt {path} is neither a run dir (no checkpoints/<step> inside) nor a run's checkpoints/<step> dir; "
        "pass the directory train.py wrote (--run-dir), or one of its checkpoints/<step> subdirectories"
    )


def _asset(configured: str | None, run_dir: Path, name: str, what: str) -> Path:
    path = Path(configured) if configured else run_dir / name
    if not path.exists():
        raise CheckpointError(f"the run's {what} {path} is missing; the run dir {run_dir} is incomplete")
    return path


def _config(saved: dict | None, run_dir: Path, step: int) -> TrainConfig:
    """The config saved with the checkpoint; config.yaml only when the checkpoint has none."""
    if saved is not None:
        return from_dict(TrainConfig, saved, origin=f"the config saved in {run_dir}/checkpoints/{step}")
    logger.warning("checkpoint %s/checkpoints/%d has no saved config; reading %s instead", run_dir, step,
                   CONFIG_COPY_FILE)
    return load_config(TrainConfig, _asset(None, run_dir, CONFIG_COPY_FILE, "config"))


def load_run(path: str | os.PathLike, *, use_ema: bool = True, mesh: Mesh | None = None) -> LoadedRun:
    """Config, trained model, transforms and norm stats of a run (see the module docstring). Every
    array is created or read straight into its FSDP sharding on `mesh` (None: the default device
    alone, what a single-device server wants)."""
    run_dir, step = resolve_run(path)
    mesh = make_mesh(1, 1, devices=jax.devices()[:1]) if mesh is None else mesh
    with RunCheckpoints(run_dir) as checkpoints:
        saved = checkpoints.restore(step)  # the JSON items only
        cfg = _config(saved.config, run_dir, saved.step)
        stats = load_norm_stats(_asset(cfg.data.norm_stats, run_dir, NORM_STATS_FILE, "norm stats"))
        tokenizer = PaligemmaTokenizer(
            _asset(cfg.policy.tokenizer, run_dir, TOKENIZER_FILE, "tokenizer"), max_len=cfg.policy.model.max_token_len
        )
        trainable, frozen = init_model(cfg, mesh, restoring=True)
        template = eqx.filter(trainable, is_inexact)  # sharded ShapeDtypeStructs: nothing built to throw away
        has_ema = cfg.optim.ema_decay is not None and use_ema
        if has_ema:
            trained = checkpoints.restore(saved.step, ema=template).ema
        else:
            trained = checkpoints.restore(saved.step, params=template).params
    model = eqx.nn.inference_mode(eqx.combine(trained, frozen))
    return LoadedRun(cfg, model, run_transforms(cfg, tokenizer, stats), stats, run_dir, saved.step, has_ema)
