"""A run's model: the policy and the energy head as siblings, and the mode's trainable filter.

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

from eqx_energy.energy import EnergyModel
from eqx_energy.policy.pi0 import Pi0

Mode = Literal["energy_only", "joint", "monitor"]


class RunModel(eqx.Module):
    policy: Pi0
    energy: EnergyModel


def trainable_spec(model: RunModel, mode: Mode) -> PyTree:
    """A tree of bools, shaped like `model`: True where a leaf is trained in `mode`."""
    if mode not in ("energy_only", "joint", "monitor"):
        raise ValueError(f"train.mode={mode!r}; choose energy_only, joint or monitor")
    train_policy = mode in ("joint", "monitor")
    train_energy = mode in ("joint", "energy_only")
    off = lambda tree: jax.tree.map(lambda _: False, tree)  # noqa: E731
    on = lambda tree: jax.tree.map(eqx.is_inexact_array, tree)  # noqa: E731
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
