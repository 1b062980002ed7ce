"""Sampling with energy correction (seed 001): the policy samples, then a few clipped gradient steps
down the energy E(prefix features, actions) refine the chunk.

    a_0, c, m = policy.sample_actions(key, obs, num_steps)       # prefix computed once, KV-cached
    a*, trace = correct(energy, c, a_0, m, CorrectionConfig(steps, alpha, clip_frac, first_only))

The prefix features come out of the sampling pass itself, so correction needs no second VLM forward.
Actions stay in the model's normalized, 32-padded space; only [..., :energy.action_dim] move.
"""

from __future__ import annotations

from jaxtyping import Array, PRNGKeyArray

from eqx_energy._typing import PaddedActions
from eqx_energy.correct import CorrectionConfig, CorrectionTrace, correct
from eqx_energy.energy import EnergyModel
from eqx_energy.policy.pi0 import Observation, Pi0


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
    """(corrected actions, base actions, trace), both (b h p). Seed-001 keyword names build the
    CorrectionConfig; alpha and clip_frac become array leaves before the jitted `correct`, so new
    values do not recompile (`sample_actions` and `correct` are the two jit boundaries)."""
    base, context, context_mask = policy.sample_actions(key, obs, num_steps)
    config = CorrectionConfig(
        steps=energy_correction_steps, alpha=energy_alpha, clip_frac=energy_clip_frac, first_only=correct_first_only
    )
    corrected, trace = correct(energy_model, context, base, context_mask, config)
    return corrected, base, trace
