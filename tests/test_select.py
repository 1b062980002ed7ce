"""Best-of-n selection: argmin over candidates, the margin gate against candidate 0, optional refinement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_energy.correct import CorrectionConfig
from eqx_energy.energy import EnergyConfig, EnergyModel
from eqx_energy.select import SelectionConfig, choose, select

CFG = EnergyConfig(context_dim=12, action_dim=3, hidden=16, num_heads=4)


def test_choose_takes_the_argmin_unless_the_gate_keeps_candidate_0():
    scores = jnp.asarray([[1.0, 0.4, 0.7], [0.5, 0.9, 0.45], [0.2, 0.3, 0.6]])
    candidates = jnp.arange(3 * 3 * 2 * 4, dtype=jnp.float32).reshape(3, 3, 2, 4)
    actions, chosen, gated = choose(scores, candidates, jnp.float32(0.0))
    np.testing.assert_array_equal(chosen, [1, 2, 0])
    np.testing.assert_array_equal(gated, [False, False, False])
    np.testing.assert_array_equal(actions, candidates[jnp.arange(3), jnp.asarray([1, 2, 0])])
    # margin 0.1: row 0 gains 0.6 (> 0.1, switches), row 1 gains 0.05 (kept at 0), row 2 is already 0
    actions, chosen, gated = choose(scores, candidates, jnp.float32(0.1))
    np.testing.assert_array_equal(chosen, [1, 0, 0])
    np.testing.assert_array_equal(gated, [False, True, False])
    np.testing.assert_array_equal(actions[1], candidates[1, 0])


@pytest.fixture(scope="module")
def scene():
    kc, ka, km = jax.random.split(jax.random.key(0), 3)
    model = EnergyModel(CFG, key=km)
    context = jax.random.normal(kc, (2, 6, CFG.context_dim))
    candidates = jax.random.normal(ka, (2, 5, 4, 8))  # (b n h p), p = 8 padded dims, the energy reads 3
    mask = jnp.arange(6)[None] < jnp.asarray([[4], [6]])
    return model, context, candidates, mask


def test_select_scores_every_candidate_and_keeps_the_lowest(scene):
    model, context, candidates, mask = scene
    actions, trace = select(model, context, candidates, mask)
    want = np.asarray([[model(context[b], candidates[b, i, :, :3], mask[b]) for i in range(5)] for b in range(2)])
    np.testing.assert_allclose(trace.energies, want, rtol=1e-6)
    np.testing.assert_array_equal(trace.chosen, want.argmin(1))
    np.testing.assert_array_equal(actions, candidates[jnp.arange(2), trace.chosen])
    assert not trace.gated.any()
    # a margin larger than any gain keeps the plain sample (candidate 0)
    kept, gated_trace = select(model, context, candidates, mask, SelectionConfig(margin=1e3))
    np.testing.assert_array_equal(kept, candidates[:, 0])
    np.testing.assert_array_equal(gated_trace.gated, want.argmin(1) != 0)


def test_one_candidate_is_the_plain_sample_bit_for_bit_and_refinement_lowers_energy(scene):
    model, context, candidates, mask = scene
    one = candidates[:, :1]
    actions, trace = select(model, context, one, mask)
    np.testing.assert_array_equal(np.asarray(actions), np.asarray(candidates[:, 0]))
    assert trace.chosen.tolist() == [0, 0]
    refined, refined_trace = select(model, context, one, mask, SelectionConfig(refine=CorrectionConfig(steps=3, alpha=0.5)))
    after = np.asarray([model(context[b], refined[b, :, :3], mask[b]) for b in range(2)])
    assert np.all(after < np.asarray(trace.energies[:, 0]))
    np.testing.assert_array_equal(np.asarray(refined[..., 3:]), np.asarray(candidates[:, 0, :, 3:]))
    with pytest.raises((ValueError, TypeError)):  # TypeError: the jaxtyping hook sees (b h p) first
        select(model, context, candidates[:, 0], mask)
