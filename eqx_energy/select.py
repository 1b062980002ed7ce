"""Best-of-n selection: score the policy's own candidates and keep the lowest energy (V-GPS, RoboMonkey).

    E_bi = E(c_b, a_bi[..., :action_dim])              the context encoded once, every candidate scored
    k_b  = argmin_i E_bi
    k_b <- 0 if E_b0 - E_bk <= margin                   the gate: keep candidate 0, the plain sample,
                                                        unless the best beats it by more than `margin`
    a*_b = a_bk_b  [-> `correct` on a*, when refine.steps > 0]

InfoNCE fixes E only up to a per-context constant, so candidates are only ever compared within one
context (guided_inference.md). Candidates are in the policy's normalized, padded space (b n h p); with
n = 1 (and no refinement) the plain sample comes back bit for bit.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from eqx_energy._typing import BatchContext, BatchContextMask, PaddedActions
from eqx_energy.correct import CorrectionConfig, correct
from eqx_energy.energy import ContextEncoding, EnergyModel, FlowTime


class SelectionConfig(eqx.Module):
    """`margin` (f32 leaf; 0 = plain argmin) gates the choice against candidate 0; `refine` corrects the
    chosen chunk afterwards (None or steps=0: no refinement)."""

    margin: float | Float[Array, ""] = eqx.field(converter=jnp.float32, default=0.0)
    refine: CorrectionConfig | None = None


class SelectionTrace(eqx.Module):
    """energies (b n) of every candidate; chosen (b,) index kept; gated (b,) whether the margin kept
    candidate 0 although another scored lower."""

    energies: Float[Array, "b n"]
    chosen: Int[Array, " b"]
    gated: Bool[Array, " b"]


def score_candidates(
    model: EnergyModel,
    encodings: ContextEncoding,
    candidates: Float[Array, "b n h a"],
    t: FlowTime | Float[Array, " b"] = None,
    *,
    key: PRNGKeyArray | None = None,
    inference: bool = True,
) -> Float[Array, "b n"]:
    """E(c_b, a_bi [, t_b]) for every candidate of every example, each context encoded once (in `encodings`);
    t is shared or one per example; `key` (with inference=False) draws dropout per candidate."""
    b, n = candidates.shape[:2]
    times = None if t is None else jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    keys = None if key is None else jax.random.split(key, (b, n))

    def per_example(enc, cands, t_b, ks):
        return jax.vmap(lambda a, k: model.score(enc, a, t_b, key=k, inference=inference))(cands, ks)

    return jax.vmap(per_example)(encodings, candidates, times, keys)


def choose(
    scores: Float[Array, "b n"], candidates: Float[Array, "b n h p"], margin: Float[Array, ""]
) -> tuple[Float[Array, "b h p"], Int[Array, " b"], Bool[Array, " b"]]:
    """The candidate of lowest score per example, gated against candidate 0 by `margin` (module doc)."""
    best = jnp.argmin(scores, axis=1)
    gain = scores[:, 0] - jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]
    gated = (best != 0) & (gain <= margin)
    chosen = jnp.where(gated, 0, best)
    return jnp.take_along_axis(candidates, chosen[:, None, None, None], axis=1)[:, 0], chosen, gated


@eqx.filter_jit
def select(
    model: EnergyModel,
    context: BatchContext,
    candidates: Float[Array, "b n h p"],
    context_mask: BatchContextMask,
    config: SelectionConfig | None = None,
) -> tuple[PaddedActions, SelectionTrace]:
    """Chosen actions (b h p) and the trace; `config=None` is `SelectionConfig()` (plain argmin)."""
    config = SelectionConfig() if config is None else config
    action_dim = model.action_dim
    if candidates.ndim != 4 or candidates.shape[-1] < action_dim:
        raise ValueError(f"candidates must be (b n h p) with p >= the energy's action_dim={action_dim}; got shape "
                         f"{candidates.shape}: sample them with policy.sample_actions(..., num_samples=n)")
    model = eqx.nn.inference_mode(model)
    encodings = jax.vmap(model.encode_context)(context, context_mask)
    energies = score_candidates(model, encodings, candidates[..., :action_dim].astype(jnp.float32))
    actions, chosen, gated = choose(energies, candidates, config.margin)
    if config.refine is not None and config.refine.steps > 0:
        actions, _ = correct(model, context, actions, context_mask, config.refine)
    return actions, SelectionTrace(energies=energies, chosen=chosen, gated=gated)
