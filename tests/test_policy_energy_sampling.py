"""Energy-guided inference: seed 001's corrected sampling, guided flow sampling, the shared entry point."""

import jax
import numpy as np
import pytest

from eqx_energy.correct import CorrectionConfig, correct
from eqx_energy.energy import EnergyConfig, EnergyModel
from eqx_energy.policy.energy_sampling import (
    GuidanceConfig,
    InferenceConfig,
    guided_sample,
    infer,
    sample_actions_with_energy_correction,
)
from eqx_energy.policy.pi0 import Pi0Config, init_pi0
from eqx_energy.select import select
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


@pytest.fixture(scope="module")
def guided_scene():
    cfg = Pi0Config.tiny()
    policy, obs = init_pi0(cfg, key=jax.random.key(0)), fake_obs(cfg)
    energy = EnergyModel(EnergyConfig(context_dim=cfg.prefix_width, action_dim=7, hidden=32, num_heads=4), key=jax.random.key(1))
    return policy, energy, obs


@pytest.mark.slow
def test_guided_sampling_scale_zero_is_plain_sampling_and_guidance_lowers_energy(guided_scene):
    policy, energy, obs = guided_scene
    key = jax.random.key(4)
    plain, context, mask = policy.sample_actions(key, obs, 3, num_samples=2)
    zero, g_context, _, zero_trace = guided_sample(policy, energy, key, obs, 3, GuidanceConfig(scale=0.0), num_samples=2)
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(g_context), np.asarray(context))
    assert zero_trace.energy.shape == (4, 2, 2)
    guided, _, _, trace = guided_sample(policy, energy, key, obs, 3, GuidanceConfig(scale=3.0, schedule="constant"), num_samples=2)
    assert np.all(np.asarray(trace.energy[-1]) < np.asarray(zero_trace.energy[-1]))
    assert np.any(np.asarray(guided[..., 7:]) != np.asarray(plain[..., 7:]))  # the flow carries the move on
    with pytest.raises(ValueError, match="time_conditioning"):
        guided_sample(policy, energy, key, obs, 3, GuidanceConfig(scale=1.0, query="x_t"))


@pytest.mark.slow
def test_every_method_shares_candidate_0_and_select_is_the_lowest_energy(guided_scene):
    policy, energy, obs = guided_scene
    key = jax.random.key(5)
    off, off_candidates = infer(policy, energy, key, obs, InferenceConfig(method="off"), 3)
    chosen, candidates = infer(policy, energy, key, obs, InferenceConfig(method="select", num_samples=3), 3)
    np.testing.assert_allclose(np.asarray(candidates[:, 0]), np.asarray(off), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(off_candidates[:, 0]))
    _, context, mask = policy.sample_actions(key, obs, 3, num_samples=3)
    want, trace = select(energy, context, candidates, mask)
    np.testing.assert_array_equal(np.asarray(chosen), np.asarray(want))
    energies = np.asarray(trace.energies)
    np.testing.assert_array_equal(np.asarray(chosen), np.asarray(candidates)[np.arange(2), energies.argmin(1)])
    with pytest.raises(ValueError, match="num_samples"):
        InferenceConfig(method="gradient", num_samples=4)
