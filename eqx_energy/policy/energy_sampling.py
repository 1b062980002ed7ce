"""Energy-guided inference from the policy's own samples: every way the energy acts on a chunk.

    off       a = a_0                                  the plain sample (candidate 0)
    gradient  a = correct(E, c, a_0)                   seed 001: clipped gradient steps on the finished chunk
    select    a = select(E, c, {a_0 .. a_n-1})         best of n by energy (eqx_energy.select)
    guided    each Euler step x <- x + dt v - lambda(t) |dt| grad E(c, q)    (seed 001's "after each
              flow step"; q = a_hat = x_t - t v, the step's clean estimate, or q = x_t with E(c, x_t, t)),
              then select among the n guided candidates (n = 1: the guided sample itself)
    oracle    the n candidates go back to the caller, which picks one (e.g. nearest a scripted expert)

Candidate i of every method is drawn with key `jax.random.split(key, n)[i]` (`Pi0.candidate_noise`); the
split is prefix-stable, so candidate 0 is the same plain sample for every method and every n, and
episodes of different methods start paired. Two host-level halves, `propose` (sample) and `decide`
(use the energy), leave room between them for the closed loop's noise (sample -> noise -> energy).
Actions stay in the model's normalized, padded space; only [..., :energy.action_dim] move.
"""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from eqx_energy._typing import PaddedActions
from eqx_energy.correct import CorrectionConfig, CorrectionTrace, correct
from eqx_energy.energy import EnergyModel
from eqx_energy.policy.pi0 import Observation, Pi0
from eqx_energy.select import SelectionConfig, SelectionTrace, score_candidates, select

Method = Literal["off", "gradient", "select", "guided", "oracle"]
METHODS: tuple[str, ...] = ("off", "gradient", "select", "guided", "oracle")


class GuidanceConfig(eqx.Module):
    """lambda(t) = scale * w(t): w = 1 (constant), 1 - t (linear: strongest near the clean end) or
    cos(pi t / 2) (cosine). `query`: where E is evaluated, a_hat (clean estimate, E(c, a_hat)) or x_t
    (E(c, x_t, t): needs a time-conditioned energy). `scale` is an f32 leaf (no recompile)."""

    scale: float | Float[Array, ""] = eqx.field(converter=jnp.float32, default=0.0)
    schedule: Literal["constant", "linear", "cosine"] = eqx.field(static=True, default="linear")
    query: Literal["a_hat", "x_t"] = eqx.field(static=True, default="a_hat")

    def __check_init__(self):
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"guidance.schedule={self.schedule!r}; choose 'constant', 'linear' or 'cosine'")
        if self.query not in ("a_hat", "x_t"):
            raise ValueError(f"guidance.query={self.query!r}; choose 'a_hat' or 'x_t'")

    def weight(self, t: Float[Array, ""]) -> Float[Array, ""]:
        """lambda(t) (class doc)."""
        if self.schedule == "constant":
            return self.scale
        if self.schedule == "linear":
            return self.scale * (1.0 - t)
        return self.scale * jnp.cos(0.5 * jnp.pi * t)


class GuidanceTrace(eqx.Module):
    """energy (num_steps + 1, b, n): E at each step's query point, then E(c, final chunk) (clean)."""

    energy: Float[Array, "k b n"]


class InferenceConfig(eqx.Module):
    """Which method (module doc) with n = `num_samples` candidates (static: shapes). `correction` is
    the gradient method's; `selection` (margin, refinement) serves select and guided; `guidance` guided's.
    None sub-configs take their defaults."""

    method: Method = eqx.field(static=True, default="off")
    num_samples: int = eqx.field(static=True, default=1)
    correction: CorrectionConfig | None = None
    selection: SelectionConfig | None = None
    guidance: GuidanceConfig | None = None

    def __check_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"inference method={self.method!r}; choose one of {list(METHODS)}")
        if self.num_samples < 1 or (self.method in ("off", "gradient") and self.num_samples != 1):
            raise ValueError(f"num_samples={self.num_samples} with method={self.method!r}: off and gradient act on "
                             "the one plain sample (num_samples=1); select, guided and oracle take n >= 1")


def _pad_like(x: Float[Array, "*b h p"], moved: Float[Array, "*b h a"]) -> Float[Array, "*b h p"]:
    return jnp.zeros_like(x).at[..., : moved.shape[-1]].set(moved)


@eqx.filter_jit
def guided_sample(
    policy: Pi0,
    energy: EnergyModel,
    key: PRNGKeyArray,
    obs: Observation,
    num_steps: int = 10,
    config: GuidanceConfig | None = None,
    *,
    num_samples: int = 1,
    kv_cache: bool = True,
) -> tuple[Float[Array, "b n h p"], Float[Array, "b s c"], Bool[Array, "b s"], GuidanceTrace]:
    """n guided candidates (b n h p), the prefix features + mask and the trace (module doc for the step).
    The gradient is dE/dq on q[..., :action_dim] only, the policy's velocity held fixed; scale 0 gives
    `policy.sample_actions(key, obs, num_steps, num_samples=n)` bit for bit."""
    config = GuidanceConfig() if config is None else config
    if config.query == "x_t" and not energy.config.time_conditioning:
        raise ValueError("guidance.query='x_t' scores noisy chunks E(c, x_t, t): it needs an energy trained with "
                         "energy.time_conditioning=true; use query='a_hat' with this one")
    energy = eqx.nn.inference_mode(energy)
    ad = energy.action_dim
    prefix = policy.prefill(obs)
    encodings = jax.vmap(energy.encode_context)(prefix.features, prefix.mask)

    def energies_and_grad(q, t):
        total = lambda a: (lambda e: (jnp.sum(e), e))(score_candidates(energy, encodings, a, t))
        (_, e), g = jax.value_and_grad(total, has_aux=True)(q[..., :ad])
        return e, g

    def guide(x_t, a_hat, t, dt):
        e, g = energies_and_grad(a_hat, None) if config.query == "a_hat" else energies_and_grad(x_t, t)
        return _pad_like(x_t, -config.weight(t) * abs(dt) * g), e

    noise = policy.candidate_noise(key, obs.state.shape[0], num_samples)
    x0, step_energies = policy.integrate(prefix, obs.state, noise, num_steps, kv_cache=kv_cache, guide=guide)
    final = score_candidates(energy, encodings, x0[..., :ad])
    return x0, prefix.features, prefix.mask, GuidanceTrace(energy=jnp.concatenate([step_energies, final[None]]))


def propose(
    policy: Pi0, energy: EnergyModel, key: PRNGKeyArray, obs: Observation, config: InferenceConfig, num_steps: int
) -> tuple[Float[Array, "b n h p"], Float[Array, "b s c"], Bool[Array, "b s"], GuidanceTrace | None]:
    """The method's n candidates (b n h p) with the prefix features and mask (guided: and its trace)."""
    if config.method == "guided":
        return guided_sample(policy, energy, key, obs, num_steps, config.guidance, num_samples=config.num_samples)
    candidates, context, mask = policy.sample_actions(key, obs, num_steps, num_samples=config.num_samples)
    return candidates, context, mask, None


def decide(
    energy: EnergyModel,
    context: Float[Array, "b s c"],
    candidates: Float[Array, "b n h p"],
    context_mask: Bool[Array, "b s"],
    config: InferenceConfig,
) -> tuple[PaddedActions, SelectionTrace | CorrectionTrace | None]:
    """The executed chunk (b h p): candidate 0 (off, oracle), corrected (gradient) or selected (select, guided)."""
    if config.method in ("select", "guided"):
        return select(energy, context, candidates, context_mask, config.selection)
    if config.method == "gradient":
        correction = CorrectionConfig() if config.correction is None else config.correction
        return correct(energy, context, candidates[:, 0], context_mask, correction)
    return candidates[:, 0], None


def infer(
    policy: Pi0, energy: EnergyModel, key: PRNGKeyArray, obs: Observation, config: InferenceConfig, num_steps: int = 10
) -> tuple[PaddedActions, Float[Array, "b n h p"]]:
    """`decide(propose(...))` with nothing in between: (executed chunk (b h p), all candidates (b n h p))."""
    candidates, context, mask, _ = propose(policy, energy, key, obs, config, num_steps)
    return decide(energy, context, candidates, mask, config)[0], candidates


def sample_actions_with_energy_correction(
    policy: Pi0,
    energy_model: EnergyModel,
    key: PRNGKeyArray,
    obs: Observation,
    *,
    num_steps: int = 10,
    energy_correction_steps: int = 3,
    energy_alpha: float | Array = 0.1,
    energy_clip_frac: float | Array = 0.2,
    correct_first_only: bool = False,
) -> tuple[PaddedActions, PaddedActions, CorrectionTrace]:
    """(corrected actions, base actions, trace), both (b h p): seed 001's API for the gradient method.
    Seed-001 keyword names build the CorrectionConfig; alpha and clip_frac become array leaves before
    the jitted `correct`, so new values do not recompile."""
    base, context, context_mask = policy.sample_actions(key, obs, num_steps)
    config = CorrectionConfig(
        steps=energy_correction_steps, alpha=energy_alpha, clip_frac=energy_clip_frac, first_only=correct_first_only
    )
    corrected, trace = correct(energy_model, context, base, context_mask, config)
    return corrected, base, trace
