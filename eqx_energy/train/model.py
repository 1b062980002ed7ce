"""A run's model: the policy and the energy head as siblings, the mode's trainable filter, and
the one way a run builds it (`init_model`), which training and `load_run` both call.

The openpi loader fills `policy`; the energy head is fresh or comes from our checkpoint. Every
array is created in its FSDP sharding (train/sharding.py), never whole on one device first.
Precision as shipped: trained leaves are f32 (the policy's master weights in joint and monitor
mode, whatever dtype the checkpoint stores), the frozen backbone is `policy.frozen_dtype`.
Trainable vs frozen is an `eqx.partition` filter spec over this container, built from the mode
(no flags threaded through the model):

    energy_only   energy leaves only (the policy is frozen and may be bf16)
    joint         every inexact leaf (policy and energy)
    monitor       policy leaves only (the energy is computed and logged, never trained)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import PyTree

from eqx_energy.checkpoints.openpi import load_openpi_params
from eqx_energy.energy import EnergyConfig, EnergyModel
from eqx_energy.policy.pi0 import Pi0, Pi0Config
from eqx_energy.train.config import TrainConfig
from eqx_energy.train.sharding import FSDP_MIN_BYTES, sharded_initializer, sharded_shapes

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


def policy_dtype(cfg: TrainConfig) -> str | None:
    """The dtype the policy's parameters are held in (DESIGN: trainable leaves are f32 whatever the
    checkpoint stores). Trained (joint, monitor): float32 master weights, cast to the compute dtype
    `policy.model.dtype` where they are used. Frozen (energy_only): `policy.frozen_dtype` (None: as
    built or stored)."""
    return cfg.policy.frozen_dtype if cfg.train.mode == "energy_only" else "float32"


def _cast_policy(model: RunModel, dtype: str | None) -> RunModel:
    """The policy's float arrays cast to `dtype` (None: unchanged); the energy head stays f32."""
    if dtype is None:
        return model
    policy = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model.policy)
    return eqx.tree_at(lambda m: m.policy, model, policy, is_leaf=lambda x: x is None)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(model_key, train_key): a run's seed split once. The model is built from model_key; step n's
    key is fold_in(train_key, n)."""
    model_key, train_key = jax.random.split(jax.random.key(seed))
    return model_key, train_key


def build_model(cfg: TrainConfig, key: jax.Array) -> RunModel:
    """A fresh policy and energy head from `key` (f32, on the default device; `init_model` builds
    a run's model sharded from this)."""
    return _build(_ModelSpec.of(cfg), key)


@dataclasses.dataclass(frozen=True)
class _ModelSpec:
    """What of a TrainConfig decides the model's values: `build_model` reads nothing else."""

    policy: Pi0Config
    energy: EnergyConfig
    learn_tau: float | None  # the initial temperature when it is learned

    @classmethod
    def of(cls, cfg: TrainConfig) -> _ModelSpec:
        return cls(cfg.policy.model, cfg.energy, cfg.loss.tau if cfg.loss.learn_tau else None)


def _build(spec: _ModelSpec, key: jax.Array, dtype: str | None = None) -> RunModel:
    """`spec`'s model from `key`, the policy cast to `dtype` (None: f32 as built)."""
    policy_key, energy_key = jax.random.split(key)
    model = RunModel(policy=Pi0(spec.policy, key=policy_key), energy=EnergyModel(spec.energy, key=energy_key, learn_tau=spec.learn_tau))
    return _cast_policy(model, dtype)


@functools.lru_cache(maxsize=8)
def _initializer(spec: _ModelSpec, dtype: str | None, create: PyTree, mesh: Mesh, min_bytes: int) -> Callable:
    """key -> the leaves `create` marks of the model in `dtype`, sharded: compiled once per process for
    a model, so a resume, `load_run` after training or a second run reuse it."""
    build = lambda k: eqx.filter(_build(spec, k, dtype), create)  # noqa: E731
    return sharded_initializer(build, jax.random.key(0), mesh=mesh, min_bytes=min_bytes)


def init_model(
    cfg: TrainConfig, mesh: Mesh, *, restoring: bool = False, min_bytes: int = FSDP_MIN_BYTES
) -> tuple[RunModel, RunModel]:
    """(trainable, frozen): the run's model partitioned by `train.mode`, every array created in its
    FSDP sharding on `mesh` (`init_sharded`; the openpi policy read shard by shard), the policy in
    `policy_dtype(cfg)`, the energy head in f32.

    Fresh leaves come from `build_model(cfg, run_keys(seed)[0])`, so a served run rebuilds the frozen
    half bit for bit. `restoring` creates the frozen half only: the trainable leaves are sharded
    ShapeDtypeStructs, the template of the checkpoint restored over them, and nothing of them is
    computed or read.
    """
    key = run_keys(cfg.train.seed)[0]
    dtype = policy_dtype(cfg)
    model_spec = _ModelSpec.of(cfg)
    shapes = sharded_shapes(eqx.filter_eval_shape(_build, model_spec, key, dtype), mesh, min_bytes)
    spec = trainable_spec(shapes, cfg.train.mode)
    create = jax.tree.map(lambda trained: not (restoring and trained), spec)
    openpi = cfg.policy.checkpoint is not None
    if openpi:  # the policy comes from the checkpoint, never from the key
        create = eqx.tree_at(lambda m: m.policy, create, jax.tree.map(lambda _: False, create.policy))
    fresh = _initializer(model_spec, dtype, create, mesh, min_bytes)(key)
    model = eqx.combine(fresh, shapes)
    if openpi and not (restoring and cfg.train.mode != "energy_only"):  # a trained policy is restored instead
        policy_shardings = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.ShapeDtypeStruct) else None, shapes.policy)
        policy = load_openpi_params(cfg.policy.checkpoint, cfg.policy.model, dtype=dtype, shardings=policy_shardings)
        model = eqx.tree_at(lambda m: m.policy, model, policy)
    return eqx.partition(model, spec)
