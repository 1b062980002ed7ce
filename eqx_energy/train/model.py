"""A run's model: the policy and the energy head as siblings, the mode's trainable filter, and
the one way a run builds it (`init_model`), which training and `load_run` both call.

The openpi loader fills `policy`; the energy head is fresh or comes from our checkpoint.
Trainable vs frozen is an `eqx.partition` filter spec over this container, built from the mode
(no flags threaded through the model):

    energy_only   energy leaves only (the policy is frozen and may be bf16)
    joint         every inexact leaf (policy and energy)
    monitor       policy leaves only (the energy is computed and logged, never trained)
"""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from eqx_energy.checkpoints.openpi import load_openpi_params
from eqx_energy.energy import EnergyModel
from eqx_energy.policy.pi0 import Pi0, init_pi0
from eqx_energy.train.config import TrainConfig

Mode = Literal["energy_only", "joint", "monitor"]


class RunModel(eqx.Module):
    policy: Pi0
    energy: EnergyModel


def is_inexact(x: object) -> bool:
    """A float/complex array, or the ShapeDtypeStruct of one (a leaf built as shapes only)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jnp.issubdtype(x.dtype, jnp.inexact)
    return eqx.is_inexact_array(x)


def trainable_spec(model: RunModel, mode: Mode) -> PyTree:
    """A tree of bools, shaped like `model`: True where a leaf is trained in `mode`."""
    if mode not in ("energy_only", "joint", "monitor"):
        raise ValueError(f"train.mode={mode!r}; choose energy_only, joint or monitor")
    train_policy = mode in ("joint", "monitor")
    train_energy = mode in ("joint", "energy_only")
    off = lambda tree: jax.tree.map(lambda _: False, tree)  # noqa: E731
    on = lambda tree: jax.tree.map(is_inexact, tree)  # noqa: E731
    return RunModel(
        policy=on(model.policy) if train_policy else off(model.policy),
        energy=on(model.energy) if train_energy else off(model.energy),
    )


def cast_frozen(frozen: RunModel, dtype: str | None) -> RunModel:
    """Cast the frozen policy's float arrays (the backbone) to `dtype`; the energy head stays f32.
    None leaves them as they are."""
    if dtype is None:
        return frozen
    target = jnp.dtype(dtype)
    policy = jax.tree.map(lambda x: x.astype(target) if eqx.is_inexact_array(x) else x, frozen.policy)
    return eqx.tree_at(lambda m: m.policy, frozen, policy, is_leaf=lambda x: x is None)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(model_key, train_key): a run's seed split once. The model is built from model_key; step n's
    key is fold_in(train_key, n)."""
    model_key, train_key = jax.random.split(jax.random.key(seed))
    return model_key, train_key


def build_model(cfg: TrainConfig, key: jax.Array, *, policy_shapes_only: bool = False) -> RunModel:
    """The policy (from the openpi checkpoint, or freshly initialized; only its ShapeDtypeStructs with
    `policy_shapes_only`) and a fresh energy head."""
    policy_key, energy_key = jax.random.split(key)
    if policy_shapes_only:
        policy = eqx.filter_eval_shape(Pi0, cfg.policy.model, key=policy_key)  # what init_pi0 returns, uncomputed
    elif cfg.policy.checkpoint:
        policy: Pi0 = load_openpi_params(cfg.policy.checkpoint, cfg.policy.model)
    else:
        policy = init_pi0(cfg.policy.model, key=policy_key)
    learn_tau = cfg.loss.tau if cfg.loss.learn_tau else None
    return RunModel(policy=policy, energy=EnergyModel(cfg.energy, key=energy_key, learn_tau=learn_tau))


def init_model(cfg: TrainConfig, *, restoring: bool = False) -> tuple[RunModel, RunModel]:
    """(trainable, frozen): `build_model` from `run_keys(cfg.train.seed)`, partitioned by
    `train.mode`; in energy_only mode the frozen policy is cast to `policy.frozen_dtype`. A served
    run rebuilds the frozen half bit for bit from this and restores the trainable half over it;
    `restoring` skips initializing a trainable fresh policy (its leaves are ShapeDtypeStructs, the
    restore template), which would only be thrown away."""
    shapes_only = restoring and cfg.train.mode != "energy_only" and not cfg.policy.checkpoint
    model = build_model(cfg, run_keys(cfg.train.seed)[0], policy_shapes_only=shapes_only)
    trainable, frozen = eqx.partition(model, trainable_spec(model, cfg.train.mode))
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen)), "a frozen leaf was not built"
    if cfg.train.mode == "energy_only":
        frozen = cast_frozen(frozen, cfg.policy.frozen_dtype)
    return trainable, frozen
