"""The training program: `run(config, run_dir)`. Init or resume, iterate, log, checkpoint.

Order matters for the user: every path is checked before anything is compiled, a run dir with
checkpoints is resumed (the data iterator included, so the batch sequence continues exactly),
and nothing already saved is overwritten. A resume whose config differs from the one saved in the
latest checkpoint is refused with the diff unless `allow_config_change`; an allowed change is
appended to `<run_dir>/config_changes.jsonl` ({"step", "time", "changes": {key: [old, new]}}).
The config saved in every checkpoint is the run's record; `config.yaml` is a copy for reading.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh

from eqx_energy._files import atomic_write
from eqx_energy.checkpoints.run import RunCheckpoints, latest_step
from eqx_energy.data.pipeline import make_pipeline
from eqx_energy.data.source import holdout_episodes
from eqx_energy.data.transforms import Compose
from eqx_energy.train.config import ConfigError, TrainConfig, from_dict, to_dict, write_config
from eqx_energy.train.inputs import CONFIG_COPY_FILE, HOLDOUT_FILE, build_inputs, model_inputs
from eqx_energy.train.metrics import DataWaitTimer, MetricsLogger
from eqx_energy.train.model import RunModel, init_model, is_inexact, run_keys
from eqx_energy.train.optim import Optimizer, group_labels, make_optimizer
from eqx_energy.train.sharding import (
    FSDP_MIN_BYTES, init_sharded, make_mesh, process_zero_first, replicated, shard_batch, sharded_shapes,
)
from eqx_energy.train.step import TrainState, init_state, make_train_step

logger = logging.getLogger(__name__)

CONFIG_CHANGES_FILE = "config_changes.jsonl"  # one line per resume that changed the config
_UNCHECKED_KEYS = ("run_dir",)  # where the run lives, not what it computes


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


def run(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    new_run: bool = False,
    allow_config_change: bool = False,
    progress: bool | None = None,
) -> Path:
    """Train; returns the run dir. Resumes from the run dir's latest checkpoint; `new_run` refuses a run
    dir that has checkpoints instead."""
    run_dir = Path(run_dir)
    check_paths(cfg)
    if (existing := latest_step(run_dir)) is not None:  # checked before anything is created or written
        if new_run:
            raise ConfigError(
                f"--new-run given but {run_dir} already has checkpoints (latest step {existing}); "
                "choose a new --run-dir, or drop --new-run to resume it"
            )
        _check_config_change(run_dir, existing, cfg, allow=allow_config_change)
    checkpoints = RunCheckpoints(run_dir, keep=cfg.train.keep_checkpoints)
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = jax.process_index() == 0  # every process shares the run dir; one writes its files
    if writer:
        write_config(cfg, run_dir / CONFIG_COPY_FILE)
    train_key = run_keys(cfg.train.seed)[1]  # init_model builds the model from the other half

    source, transforms, stats = process_zero_first(lambda: build_inputs(cfg, run_dir), "run inputs")  # may write files
    holdout = holdout_episodes(source.info["total_episodes"], cfg.data.holdout_fraction, cfg.data.holdout_seed)
    if writer:
        atomic_write(run_dir / HOLDOUT_FILE, json.dumps([int(e) for e in holdout]))
    pipeline = make_pipeline(
        source, Compose((*transforms.inputs, model_inputs)), batch_size=cfg.data.batch_size,
        seed=cfg.train.seed, workers=cfg.data.workers,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
    )
    data_iter = iter(pipeline)

    mesh = make_mesh(*cfg.train.mesh)
    frozen, state, optimizer = start_state(cfg, mesh, checkpoints, data_iter)
    start = int(state.step)
    if start:
        logger.info("resumed %s at step %d", run_dir, start)

    step_fn = make_train_step(
        optimizer, mode=cfg.train.mode, loss_cfg=cfg.loss,
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


def _check_config_change(run_dir: Path, step: int, cfg: TrainConfig, *, allow: bool) -> None:
    """Refuse to resume with a config other than the one saved at `step`, unless `allow`; an allowed
    change is logged in the run."""
    with RunCheckpoints(run_dir) as checkpoints:
        saved = checkpoints.restore(step).config
    if saved is None:
        changes = {"<config>": ["<not saved in the checkpoint>", "<this config>"]}
    else:
        changes = config_diff(saved, to_dict(cfg))
    if not changes:
        return
    shown = "; ".join(f"{key}: {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changes.items())
    if not allow:
        raise ConfigError(
            f"{run_dir} was trained to step {step} with a different config ({shown}); resume with the same "
            "config, pass --allow-config-change to continue with this one (logged in the run), or choose a new --run-dir"
        )
    logger.warning("resuming %s at step %d with a changed config: %s", run_dir, step, shown)
    log = run_dir / CONFIG_CHANGES_FILE
    if jax.process_index() == 0:  # one line per resume, not one per process
        earlier = log.read_text() if log.exists() else ""
        atomic_write(log, earlier + json.dumps({"step": step, "time": time.time(), "changes": changes}) + "\n")


def config_diff(saved: dict, current: dict) -> dict[str, list]:
    """{dotted key: [saved value, current value]} for every key whose value differs (absent: None),
    except `_UNCHECKED_KEYS`. The saved dict is read through TrainConfig first, so keys added since it
    was written compare as their defaults."""
    try:
        saved = to_dict(from_dict(TrainConfig, saved, origin="the checkpoint's saved config"))
    except ValueError:  # a key since renamed or removed: compare the raw dicts, which shows it
        pass
    old, new = _flatten(saved), _flatten(current)
    return {
        key: [old.get(key), new.get(key)]
        for key in sorted(old.keys() | new.keys())
        if key not in _UNCHECKED_KEYS and old.get(key) != new.get(key)
    }


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists are leaves."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def start_state(
    cfg: TrainConfig, mesh: Mesh, checkpoints: RunCheckpoints, data_iter: Iterator | None = None,
    *, min_bytes: int = FSDP_MIN_BYTES,
) -> tuple[RunModel, TrainState, Optimizer]:
    """(frozen half, train state, optimizer) on `mesh`: restored from the latest checkpoint when there
    is one (`data_iter` moved to its position), fresh otherwise. Either way every array is created
    in its FSDP sharding (`init_sharded`, or orbax reading each device's shards into the sharded
    templates), params, optimizer state and EMA in f32 whatever the checkpoint stores."""
    restoring = checkpoints.latest_step is not None
    trainable, frozen = init_model(cfg, mesh, restoring=restoring, min_bytes=min_bytes)
    params = eqx.filter(trainable, is_inexact)
    del trainable  # only `params` may hold the trainable arrays: init_sharded donates them
    optimizer = make_optimizer(
        cfg.optim, group_labels(params), total_steps=cfg.train.steps, energy_warm_steps=cfg.train.energy_warm_steps
    )
    init = functools.partial(init_state, optimizer=optimizer, ema=cfg.optim.ema_decay is not None)
    if not restoring:
        return frozen, init_sharded(init, params, mesh=mesh, min_bytes=min_bytes, donate=True), optimizer
    template = sharded_shapes(eqx.filter_eval_shape(init, params), mesh, min_bytes)
    restored = checkpoints.restore(
        params=template.params, opt_state=template.opt_state, ema=template.ema, data_iter=data_iter
    )
    state = TrainState(
        params=restored.params, opt_state=restored.opt_state, ema=restored.ema,
        step=jax.device_put(np.int32(restored.step), replicated(mesh)),
        skipped=jax.device_put(np.int32(restored.skipped), replicated(mesh)),
    )
    return frozen, state, optimizer
