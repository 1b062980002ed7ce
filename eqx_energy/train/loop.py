"""The training program: `run(config, run_dir)`. Init or resume, iterate, log, checkpoint.

Order matters for the user: every path is checked before anything is compiled, a run dir with
checkpoints is resumed (the data iterator included, so the batch sequence continues exactly),
and nothing already saved is overwritten.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from eqx_energy.checkpoints.openpi import load_openpi_params
from eqx_energy.checkpoints.run import RunCheckpoints, abstract, latest_step
from eqx_energy.data.norm_stats import NormStats, compute_norm_stats, load_norm_stats, save_norm_stats
from eqx_energy.data.pipeline import make_pipeline
from eqx_energy.data.source import LeRobotSource, holdout_episodes
from eqx_energy.data.transforms import Compose, DeltaActions, Group, LiberoInputs, make_bool_mask, policy_transforms
from eqx_energy.energy import EnergyModel
from eqx_energy.policy.pi0 import Pi0, init_pi0
from eqx_energy.policy.tokenizer import PaligemmaTokenizer, train_sentencepiece
from eqx_energy.train.config import ConfigError, TrainConfig, to_dict, write_config
from eqx_energy.train.metrics import DataWaitTimer, MetricsLogger
from eqx_energy.train.model import RunModel, cast_frozen, trainable_spec
from eqx_energy.train.optim import group_labels, make_optimizer
from eqx_energy.train.sharding import fsdp_shardings, make_mesh, replicated, shard_batch
from eqx_energy.train.step import TrainState, init_state, make_train_step

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = ("image", "image_mask", "state", "tokenized_prompt", "tokenized_prompt_mask", "actions")
TOKENIZER_FILE = "tokenizer.model"
NORM_STATS_FILE = "norm_stats.json"
HOLDOUT_FILE = "holdout_episodes.json"


def check_paths(cfg: TrainConfig) -> None:
    """Fail before any compilation if an input the config names does not exist."""
    info = Path(cfg.data.root) / "meta" / "info.json"
    if not info.is_file():
        raise ConfigError(
            f"data.root={cfg.data.root!r} is not a LeRobot dataset (no {info}); point it at the dataset "
            "directory with --set data.root=PATH (for the demo: python -m eqx_energy.sim.generate)"
        )
    for key, value in (
        ("policy.checkpoint", cfg.policy.checkpoint),
        ("policy.tokenizer", cfg.policy.tokenizer),
        ("data.norm_stats", cfg.data.norm_stats),
    ):
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{key}={value!r} does not exist; give the path with --set {key}=PATH")
    width = cfg.policy.model.prefix_width
    if cfg.energy.context_dim != width:
        raise ConfigError(
            f"energy.context_dim={cfg.energy.context_dim} but the policy's prefix features have width {width} "
            f"({cfg.policy.model.paligemma_variant}); set energy.context_dim={width}"
        )
    if (cfg.data.image_key is None) != (cfg.policy.model.image_keys == ()):
        raise ConfigError(
            f"data.image_key={cfg.data.image_key!r} but policy.model.image_keys={list(cfg.policy.model.image_keys)}: "
            "a state-only run sets both data.image_key: null (and data.wrist_key: null) and policy.model.image_keys: []"
        )
    if cfg.energy.action_dim != cfg.data.action_dim:
        raise ConfigError(
            f"energy.action_dim={cfg.energy.action_dim} but data.action_dim={cfg.data.action_dim}; "
            "the energy scores the environment's action dims"
        )


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


def build_model(cfg: TrainConfig, key: jax.Array) -> RunModel:
    """The policy (from the openpi checkpoint, or freshly initialized) and a fresh energy head."""
    policy_key, energy_key = jax.random.split(key)
    if cfg.policy.checkpoint:
        policy: Pi0 = load_openpi_params(cfg.policy.checkpoint, cfg.policy.model)
    else:
        policy = init_pi0(cfg.policy.model, key=policy_key)
    return RunModel(policy=policy, energy=EnergyModel(cfg.energy, key=energy_key))


def run(cfg: TrainConfig, run_dir: str | Path, *, restart: bool = False, progress: bool | None = None) -> Path:
    """Train; returns the run dir. Resumes from the run dir's latest checkpoint unless `restart`."""
    run_dir = Path(run_dir)
    check_paths(cfg)
    if restart and (existing := latest_step(run_dir)) is not None:  # checked before anything is created
        raise ConfigError(
            f"--restart given but {run_dir} already has checkpoints (latest step {existing}); "
            "choose a new --run-dir, or drop --restart to resume"
        )
    checkpoints = RunCheckpoints(run_dir, keep=cfg.train.keep_checkpoints)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir / "config.yaml")
    model_key, train_key = jax.random.split(jax.random.key(cfg.train.seed))

    source, transforms, stats = build_inputs(cfg, run_dir)
    holdout = holdout_episodes(source.info["total_episodes"], cfg.data.holdout_fraction, cfg.data.holdout_seed)
    (run_dir / HOLDOUT_FILE).write_text(json.dumps([int(e) for e in holdout]))
    pipeline = make_pipeline(
        source, Compose((*transforms.inputs, model_inputs)), batch_size=cfg.data.batch_size,
        seed=cfg.train.seed, workers=cfg.data.workers,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
    )
    data_iter = iter(pipeline)

    model = build_model(cfg, model_key)
    mode = cfg.train.mode
    trainable, frozen = eqx.partition(model, trainable_spec(model, mode))
    if mode == "energy_only":
        frozen = cast_frozen(frozen, cfg.policy.frozen_dtype)
    params = eqx.filter(trainable, eqx.is_inexact_array)
    optimizer = make_optimizer(
        cfg.optim, group_labels(params), total_steps=cfg.train.steps, energy_warm_steps=cfg.train.energy_warm_steps
    )
    state = init_state(trainable, optimizer, ema=cfg.optim.ema_decay is not None)

    mesh = make_mesh(*cfg.train.mesh)
    state = _place(state, mesh)
    frozen = _place(frozen, mesh)

    start = 0
    if checkpoints.latest_step is not None:
        restored = checkpoints.restore(
            params=abstract(state.params), opt_state=abstract(state.opt_state),
            ema=None if state.ema is None else abstract(state.ema), data_iter=data_iter,
        )
        start = restored.step
        state = TrainState(
            params=restored.params, opt_state=restored.opt_state, ema=restored.ema,
            step=jax.device_put(np.int32(start), replicated(mesh)),
            skipped=jax.device_put(np.int32(restored.skipped), replicated(mesh)),
        )
        logger.info("resumed %s at step %d", run_dir, start)

    step_fn = make_train_step(
        optimizer, mode=mode, loss_cfg=cfg.loss,
        grad_to_backbone=cfg.train.energy_grad_to_backbone, ema_decay=cfg.optim.ema_decay,
    )
    config_dict = to_dict(cfg)
    timer = DataWaitTimer(data_iter)
    with MetricsLogger(
        run_dir, total_steps=cfg.train.steps, start_step=start, use_wandb=cfg.train.wandb,
        config=config_dict, progress=progress,
    ) as metrics_log:
        for step in range(start, cfg.train.steps):
            batch = shard_batch(next(timer), mesh)
            state, metrics = step_fn(frozen, state, batch, jax.random.fold_in(train_key, step))
            done = step + 1
            if done % cfg.train.log_interval == 0 or done == cfg.train.steps:
                metrics_log.log(done, metrics, data_wait_s=timer.pop())
            if done % cfg.train.checkpoint_interval == 0 or done == cfg.train.steps:
                checkpoints.save(
                    done, params=state.params, opt_state=state.opt_state, ema=state.ema,
                    skipped=state.skipped, config=config_dict, data_iter=data_iter, norm_stats=stats,
                )
    checkpoints.close()
    return run_dir


def _place(tree, mesh):
    """Arrays onto the mesh by the FSDP rule (small leaves replicated)."""
    shardings = fsdp_shardings(tree, mesh)
    return jax.tree.map(
        lambda x, s: jax.device_put(x, s) if s is not None else x, tree, shardings,
        is_leaf=lambda x: x is None,
    )
