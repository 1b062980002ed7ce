"""Best-of-n selection: argmin over candidates, the margin gate against candidate 0, optional refinement."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_energy.correct import CorrectionConfig
from eqx_energy.energy import EnergyConfig, EnergyModel
from eqx_energy.select import SelectionConfig, choose, select

CFG = EnergyConfig(context_dim=12, action_dim=3, hidden=16, num_heads=4)
# `select` is jitted; the checks' own jax work is too: run eagerly, every primitive compiles on its own
# (~0.1 s at -O0). Arithmetic on the results is numpy on host copies.
jit = eqx.filter_jit


def test_choose_takes_the_argmin_unless_the_gate_keeps_candidate_0():
    scores = np.asarray([[1.0, 0.4, 0.7], [0.5, 0.9, 0.45], [0.2, 0.3, 0.6]], np.float32)
    candidates = np.arange(3 * 3 * 2 * 4, dtype=np.float32).reshape(3, 3, 2, 4)
    actions, chosen, gated = jit(choose)(scores, candidates, jnp.float32(0.0))
    np.testing.assert_array_equal(chosen, [1, 2, 0])
    np.testing.assert_array_equal(gated, [False, False, False])
    np.testing.assert_array_equal(actions, candidates[np.arange(3), [1, 2, 0]])
    # margin 0.1: row 0 gains 0.6 (> 0.1, switches), row 1 gains 0.05 (kept at 0), row 2 is already 0
    actions, chosen, gated = jit(choose)(scores, candidates, jnp.float32(0.1))
    np.testing.assert_array_equal(chosen, [1, 0, 0])
    np.testing.assert_array_equal(gated, [False, True, False])
    np.testing.assert_array_equal(actions[1], candidates[1, 0])


@pytest.fixture(scope="module")
def scene():
    """Model (built eagerly: a jitted initializer compiles the whole random init, ~2.5 s), contexts,
    candidates and masks of 2 examples."""
    kc, ka, km = jax.random.split(jax.random.key(0), 3)
    model = EnergyModel(CFG, key=km)

    @jit
    def inputs(kc, ka):
        context = jax.random.normal(kc, (2, 6, CFG.context_dim))
        candidates = jax.random.normal(ka, (2, 5, 4, 8))  # (b n h p), p = 8 padded dims, the energy reads 3
        return context, candidates, jnp.arange(6)[None] < jnp.asarray([[4], [6]])

    return model, *inputs(kc, ka)


@jit
def energies(model, context, candidates, mask):
    """E(c_b, a_bi[..., :3]) of every candidate, the model's plain __call__ one candidate at a time: (b n)."""
    per_example = lambda c, cands, m: jax.vmap(lambda a: model(c, a[:, :3], m))(cands)  # noqa: E731
    return jax.vmap(per_example)(context, candidates, mask)


def test_select_scores_every_candidate_and_keeps_the_lowest(scene):
    model, context, candidates, mask = scene
    actions, trace = select(model, context, candidates, mask)
    want = np.asarray(energies(model, context, candidates, mask))
    np.testing.assert_allclose(trace.energies, want, rtol=1e-6)
    np.testing.assert_array_equal(trace.chosen, want.argmin(1))
    candidates = np.asarray(candidates)
    np.testing.assert_array_equal(actions, candidates[np.arange(2), np.asarray(trace.chosen)])
    assert not np.asarray(trace.gated).any()
    # a margin larger than any gain keeps the plain sample (candidate 0)
    kept, gated_trace = select(model, context, candidates, mask, SelectionConfig(margin=1e3))
    np.testing.assert_array_equal(kept, candidates[:, 0])
    np.testing.assert_array_equal(gated_trace.gated, want.argmin(1) != 0)


def test_one_candidate_is_the_plain_sample_bit_for_bit_and_refinement_lowers_energy(scene):
    model, context, candidates, mask = scene
    candidates = np.asarray(candidates)
    one = candidates[:, :1]
    actions, trace = select(model, context, one, mask)
    np.testing.assert_array_equal(np.asarray(actions), candidates[:, 0])
    assert trace.chosen.tolist() == [0, 0]
    refined, refined_trace = select(model, context, one, mask, SelectionConfig(refine=CorrectionConfig(steps=3, alpha=0.5)))
    after = np.asarray(energies(model, context, np.asarray(refined)[:, None], mask))[:, 0]
    assert np.all(after < np.asarray(trace.energies)[:, 0])
    np.testing.assert_array_equal(np.asarray(refined)[..., 3:], candidates[:, 0, :, 3:])
    with pytest.raises((ValueError, TypeError)):  # TypeError: the jaxtyping hook sees (b h p) first
        select(model, context, candidates[:, 0], mask)
