"""sample_actions_with_energy_correction = sample_actions, then correct() on its own prefix features."""

import jax
import numpy as np
import pytest

from eqx_energy.correct import CorrectionConfig, correct
from eqx_energy.energy import EnergyConfig, EnergyModel
from eqx_energy.policy.energy_sampling import sample_actions_with_energy_correction
from eqx_energy.policy.pi0 import Pi0Config, init_pi0
from tests.test_policy_pi0 import fake_obs


@pytest.mark.slow
def test_corrected_sampling_composes_sample_and_correct():
    cfg = Pi0Config.tiny()
    policy, obs = init_pi0(cfg, key=jax.random.key(0)), fake_obs(cfg)
    energy = EnergyModel(EnergyConfig(context_dim=cfg.prefix_width, action_dim=7, hidden=32, num_heads=4), key=jax.random.key(1))
    key = jax.random.key(2)
    corrected, base, trace = sample_actions_with_energy_correction(
        policy, energy, key, obs, num_steps=3, energy_correction_steps=2, energy_alpha=0.05, correct_first_only=True
    )
    want_base, context, mask = policy.sample_actions(key, obs, 3)
    want, want_trace = correct(energy, context, want_base, mask, CorrectionConfig(steps=2, alpha=0.05, first_only=True))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(want_base))
    np.testing.assert_allclose(np.asarray(corrected), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(trace.energy), np.asarray(want_trace.energy), rtol=1e-6)
    assert trace.energy.shape == (3, 2)
    # only step 0 of the chunk and only the energy's 7 dims move
    changed = np.asarray(corrected != base)
    assert not changed[:, 1:].any() and not changed[..., 7:].any()
