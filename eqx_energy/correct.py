"""Inference-time correction: a few clipped gradient steps down the energy (seed 001).

    g = dE/da on a[..., :action_dim];  step = alpha * g   (only the moving entries)
    step <- step * min(1, max(clip_frac * ||a||, clip_floor) / ||step||)      per example
    a    <- a - step  (+ sqrt(2 alpha) * sigma_k * N(0, I) for the Langevin method)

`steps` times in `jax.lax.scan`, the context encoded once outside the loop. Batched: inputs carry
a leading b axis. Actions are in the policy's normalized space (correct before unnormalizing).
A non-finite context (on valid tokens), start or result stops `correct` with `eqx.error_if`
(EquinoxRuntimeError; `EQX_ON_ERROR` picks the behaviour): no actions come out of a NaN.
"""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from eqx_energy._typing import BatchActions, BatchContext, BatchContextMask, PaddedActions
from eqx_energy.energy import ContextEncoding, EnergyModel


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


class CorrectionConfig(eqx.Module):
    """How to correct. Structural fields are static; the numeric ones are f32 array leaves, so a
    jitted `correct` sees a new alpha/clip_frac/noise without recompiling.

    Defaults are seed 001's (3 steps, alpha 0.1, clip 0.2 of ||a||, whole chunk). `act_dim=None`
    means the energy model's `action_dim`. `method="langevin"` adds sqrt(2 alpha) * sigma_k noise
    per step, with sigma_k = noise_scale * noise_decay**k (annealed when noise_decay < 1, IBC-style).
    """

    steps: int = eqx.field(static=True, default=3)
    alpha: float | Float[Array, ""] = eqx.field(converter=_f32, default=0.1)
    clip_frac: float | Float[Array, ""] = eqx.field(converter=_f32, default=0.2)
    act_dim: int | None = eqx.field(static=True, default=None)
    first_only: bool = eqx.field(static=True, default=False)
    clip_floor: float | Float[Array, ""] = eqx.field(converter=_f32, default=1e-3)
    method: Literal["gradient", "langevin"] = eqx.field(static=True, default="gradient")
    noise_scale: float | Float[Array, ""] = eqx.field(converter=_f32, default=0.0)
    noise_decay: float | Float[Array, ""] = eqx.field(converter=_f32, default=1.0)

    def __check_init__(self):
        if self.steps < 0:
            raise ValueError(f"correction.steps must be >= 0, got {self.steps}")
        if self.method not in ("gradient", "langevin"):
            raise ValueError(f"correction.method={self.method!r}; choose 'gradient' or 'langevin'")


class CorrectionTrace(eqx.Module):
    """energy (steps+1, b) including the start; step_norm (steps, b) of the applied gradient step;
    clipped (steps, b) whether the step was scaled down."""

    energy: Float[Array, "k b"]
    step_norm: Float[Array, "n b"]
    clipped: Bool[Array, "n b"]


def _norm(x: Float[Array, "b h a"]) -> Float[Array, " b"]:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2)))


def _score_and_grad(
    model: EnergyModel, encodings: ContextEncoding, actions: BatchActions
) -> tuple[Float[Array, " b"], BatchActions]:
    """Per-example energies and dE_i/da_i (the sum's gradient: examples are independent)."""

    def total(a, m):
        energies = jax.vmap(m.score)(encodings, a)
        return jnp.sum(energies), energies

    (_, energies), grads = eqx.filter_value_and_grad(total, has_aux=True)(actions, model)
    return energies, grads


def _check_actions(model: EnergyModel, actions, name: str, exact: bool) -> None:
    action_dim = model.action_dim
    if actions.ndim != 3:
        raise ValueError(f"{name} must be batched (b h a), got shape {actions.shape}")
    if exact and actions.shape[-1] != action_dim:
        raise ValueError(
            f"{name} have a={actions.shape[-1]} dims but the energy's action_dim={action_dim}; "
            "slice padded model actions to [..., :action_dim] (or call `correct`, which slices)"
        )
    if actions.shape[-1] < action_dim:
        raise ValueError(
            f"{name} have p={actions.shape[-1]} dims but the energy's action_dim={action_dim}; "
            "pass padded model actions (b h p), not unpadded env actions"
        )


@eqx.filter_jit
def energy_and_grad(
    model: EnergyModel, context: BatchContext, actions: BatchActions, context_mask: BatchContextMask
) -> tuple[Float[Array, " b"], BatchActions]:
    """E(c_i, a_i) (b,) and dE/da (b h a), differentiating the actions, not the model."""
    _check_actions(model, actions, "actions", exact=True)
    model = eqx.nn.inference_mode(model)
    return _score_and_grad(model, jax.vmap(model.encode_context)(context, context_mask), actions)


@eqx.filter_jit
def correct(
    model: EnergyModel,
    context: BatchContext,
    actions: PaddedActions,
    context_mask: BatchContextMask,
    config: CorrectionConfig | None = None,
    *,
    key: PRNGKeyArray | None = None,
) -> tuple[PaddedActions, CorrectionTrace]:
    """Corrected actions (b h p) and the trace. Only [..., :action_dim] move (only step 0 of the
    chunk if `first_only`); every other entry comes back bit-identical. `config=None` means
    `CorrectionConfig()` (built here: a default instance would create arrays at import time).
    Raises EquinoxRuntimeError on a non-finite context (valid tokens), start or result."""
    config = CorrectionConfig() if config is None else config
    _check_actions(model, actions, "actions", exact=False)
    action_dim = model.action_dim
    if config.act_dim is not None and config.act_dim != action_dim:
        raise ValueError(
            f"correction.act_dim={config.act_dim} but the energy model scores action_dim={action_dim}; "
            "leave act_dim unset (None) or make them equal"
        )
    if config.method == "langevin" and key is None:
        raise ValueError("correction.method='langevin' needs a key")
    model = eqx.nn.inference_mode(model)
    context = eqx.error_if(context, ~jnp.all(jnp.isfinite(context) | ~context_mask[..., None]),
                           "correct: the context is non-finite on valid tokens; the policy produced NaN/inf")
    start = actions[..., :action_dim].astype(jnp.float32)
    start = eqx.error_if(start, ~jnp.all(jnp.isfinite(start)), "correct: the actions to correct are non-finite")
    encodings = jax.vmap(model.encode_context)(context, context_mask)
    horizon = actions.shape[1]
    move = (jnp.arange(horizon) == 0) if config.first_only else jnp.ones(horizon, bool)
    move = move[None, :, None]
    step_keys = (
        jax.random.split(key, config.steps) if key is not None else jnp.zeros((config.steps,), jnp.uint32)
    )

    def body(a, inputs):
        k, step_key = inputs
        energies, grads = _score_and_grad(model, encodings, a)
        step = jnp.where(move, config.alpha * grads, 0.0)
        limit = jnp.maximum(config.clip_frac * _norm(jnp.where(move, a, 0.0)), config.clip_floor)
        step_norm = _norm(step)
        scale = jnp.minimum(1.0, limit / jnp.maximum(step_norm, 1e-12))
        a = a - scale[:, None, None] * step
        if config.method == "langevin":
            sigma = config.noise_scale * config.noise_decay**k
            noise = jax.random.normal(step_key, a.shape)
            a = a + jnp.where(move, jnp.sqrt(2.0 * config.alpha) * sigma * noise, 0.0)
        return a, (energies, scale * step_norm, scale < 1.0)

    final, (energies, step_norms, clipped) = jax.lax.scan(
        body, start, (jnp.arange(config.steps), step_keys)
    )
    final_energy = jax.vmap(model.score)(encodings, final)
    moved = jnp.where(move, final, start).astype(actions.dtype)
    moved = eqx.error_if(moved, ~jnp.all(jnp.isfinite(moved)), "correct: the corrected actions are non-finite "
                         "(NaN/inf energy gradients: check the energy's parameters)")
    new_actions = actions.at[..., :action_dim].set(moved)
    trace = CorrectionTrace(
        energy=jnp.concatenate([energies, final_energy[None]], axis=0),
        step_norm=step_norms,
        clipped=clipped,
    )
    return new_actions, trace
