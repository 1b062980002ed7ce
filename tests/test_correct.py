import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_energy import CorrectionConfig, EnergyConfig, EnergyModel
from eqx_energy.correct import correct, energy_and_grad
from eqx_energy.synthetic import synthetic_batch

CFG = EnergyConfig(context_dim=32, action_dim=4, hidden=32, num_heads=4, output="softplus")
PADDED = 7
# `correct` and `energy_and_grad` are jitted; the checks' own jax work is too: run eagerly, every
# primitive compiles on its own (~0.1 s at -O0). Arithmetic on their results is numpy on host copies.
jit = eqx.filter_jit


@pytest.fixture(scope="module")
def setup():
    """Model (built eagerly: a jitted initializer compiles the whole random init, ~2.5 s), context,
    actions, the actions padded to PADDED dims with noise, mask; key 0."""
    key = jax.random.key(0)
    model = EnergyModel(CFG, key=key)

    @jit
    def batch(key):
        context, actions, mask = synthetic_batch(key, 4, valid_tokens=6)
        padded = jnp.concatenate([actions, jax.random.normal(key, (*actions.shape[:2], PADDED - 4))], -1)
        return context, actions, padded, mask

    context, actions, padded, mask = batch(key)
    return model, context, actions, padded, mask


@jit
def energies(model, context, actions, mask):
    """E(c_i, a_i[..., :action_dim]) of every example, the model's plain __call__."""
    return jax.vmap(model)(context, actions[..., : model.action_dim], mask)


def _with(x, index, value):
    """A host copy of x with x[index] = value (`.at[].set` run eagerly would compile a scatter)."""
    x = np.array(x)
    x[index] = value
    return x


def test_energy_and_grad_matches_central_differences(setup, key):
    model, context, _, _, mask = setup
    # generic actions: the synthetic ramps sit on a ReLU kink of this random model (one-sided slopes differ)
    actions = jax.random.normal(jax.random.fold_in(key, 7), (4, 8, 4))
    energy, grads = energy_and_grad(model, context, actions, mask)
    np.testing.assert_allclose(energy, energies(model, context, actions, mask), rtol=1e-6)
    # The oracle runs in f64 (ReLU kinks and f32 round-off make f32 differences unreliable).
    jax.config.update("jax_enable_x64", True)
    try:
        to64 = lambda x: jnp.asarray(np.asarray(x, np.float64)) if eqx.is_inexact_array(x) else x  # noqa: E731
        model64, context64, actions64 = jax.tree.map(to64, (model, context, actions))
        _, grads64 = energy_and_grad(model64, context64, actions64, mask)
        grads64 = np.asarray(grads64)
        # the differences on the host, each energy one jitted call: run eagerly, every op would compile
        context64, actions64, mask = np.asarray(context64), np.asarray(actions64), np.asarray(mask)
        energy64 = jit(model64)
        rng = np.random.default_rng(0)
        eps = 1e-8
        for b in range(actions.shape[0]):
            direction = rng.normal(size=actions.shape[1:])
            e = lambda a: energy64(context64[b], a, mask[b])  # noqa: E731
            fd = (e(actions64[b] + eps * direction) - e(actions64[b] - eps * direction)) / (2 * eps)
            np.testing.assert_allclose(np.sum(grads64[b] * direction), fd, rtol=1e-5, atol=1e-9)
    finally:
        jax.config.update("jax_enable_x64", False)
    np.testing.assert_allclose(grads, grads64, rtol=1e-4, atol=1e-7)


def test_energy_and_grad_rejects_padded_actions(setup):
    model, context, _, padded, mask = setup
    with pytest.raises(ValueError, match="action_dim"):
        energy_and_grad(model, context, padded, mask)


def test_trace_starts_at_model_energy_and_never_increases(setup):
    model, context, _, padded, mask = setup
    cfg = CorrectionConfig(steps=5, alpha=1e-3, clip_frac=10.0)
    new, trace = correct(model, context, padded, mask, cfg)
    assert trace.energy.shape == (6, 4) and trace.step_norm.shape == (5, 4) and trace.clipped.shape == (5, 4)
    energy = np.asarray(trace.energy)
    np.testing.assert_allclose(energy[0], energies(model, context, padded, mask), rtol=1e-6)
    np.testing.assert_allclose(energy[-1], energies(model, context, new, mask), rtol=1e-6)
    assert np.all(np.diff(energy, axis=0) <= 1e-7)
    assert np.all(energy[-1] < energy[0])


def test_clip_bound_holds_exactly(setup):
    model, context, _, padded, mask = setup
    cfg = CorrectionConfig(steps=3, alpha=100.0, clip_frac=0.05)
    new, trace = correct(model, context, padded, mask, cfg)
    assert np.all(np.asarray(trace.clipped))
    # first step: ||a1 - a0|| == clip_frac * ||a0|| per example
    one, _ = correct(model, context, padded, mask, CorrectionConfig(steps=1, alpha=100.0, clip_frac=0.05))
    padded = np.asarray(padded)
    moved = np.linalg.norm((np.asarray(one) - padded).reshape(4, -1), axis=1)
    limit = 0.05 * np.linalg.norm(padded[..., :4].reshape(4, -1), axis=1)
    np.testing.assert_allclose(moved, limit, rtol=1e-5)
    np.testing.assert_allclose(trace.step_norm[0], limit, rtol=1e-5)


def test_clip_floor_lets_zero_actions_move(setup):
    model, context, _, _, mask = setup
    zeros = np.zeros((4, 8, 4), np.float32)
    new, trace = correct(model, context, zeros, mask, CorrectionConfig(steps=1, alpha=10.0, clip_floor=0.01))
    norms = np.linalg.norm(np.asarray(new).reshape(4, -1), axis=1)
    np.testing.assert_allclose(norms, 0.01, rtol=1e-5)


def test_padding_and_first_only_untouched_bit_identical(setup):
    model, context, _, padded, mask = setup
    new, _ = correct(model, context, padded, mask, CorrectionConfig(steps=3))
    first, _ = correct(model, context, padded, mask, CorrectionConfig(steps=3, first_only=True))
    new, first, padded = np.asarray(new), np.asarray(first), np.asarray(padded)
    np.testing.assert_array_equal(new[..., 4:], padded[..., 4:])
    assert not np.array_equal(new[..., :4], padded[..., :4])
    np.testing.assert_array_equal(first[:, 1:], padded[:, 1:])
    np.testing.assert_array_equal(first[..., 4:], padded[..., 4:])
    assert not np.array_equal(first[:, 0, :4], padded[:, 0, :4])


def test_new_alpha_does_not_recompile(setup):
    model, context, _, padded, mask = setup
    traces = []

    @eqx.filter_jit
    def run(model, context, actions, mask, cfg):
        traces.append(1)
        return correct(model, context, actions, mask, cfg)

    for alpha in (0.01, 0.1, 0.3):
        run(model, context, padded, mask, CorrectionConfig(alpha=alpha, clip_frac=0.5))
    assert len(traces) == 1
    a, _ = run(model, context, padded, mask, CorrectionConfig(alpha=0.01))
    b, _ = run(model, context, padded, mask, CorrectionConfig(alpha=0.3))
    assert not np.array_equal(a, b)


def test_langevin_needs_key_and_is_reproducible(setup, key):
    model, context, _, padded, mask = setup
    cfg = CorrectionConfig(steps=4, method="langevin", noise_scale=0.1, noise_decay=0.5)
    with pytest.raises(ValueError, match="key"):
        correct(model, context, padded, mask, cfg)
    a, _ = correct(model, context, padded, mask, cfg, key=key)
    b, _ = correct(model, context, padded, mask, cfg, key=key)
    c, _ = correct(model, context, padded, mask, cfg, key=jax.random.key(9))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g, _ = correct(model, context, padded, mask, CorrectionConfig(steps=4))
    zero_noise, _ = correct(model, context, padded, mask, CorrectionConfig(steps=4, method="langevin"), key=key)
    np.testing.assert_allclose(zero_noise, g, rtol=1e-6)


def test_config_errors(setup):
    model, context, _, padded, mask = setup
    with pytest.raises(ValueError, match="act_dim"):
        correct(model, context, padded, mask, CorrectionConfig(act_dim=7))
    with pytest.raises(ValueError, match="action_dim"):
        correct(model, context, np.asarray(padded)[..., :2], mask, CorrectionConfig())
    with pytest.raises(ValueError, match="steps"):
        CorrectionConfig(steps=-1)


def test_non_finite_context_actions_or_result_stop_correction(setup):
    """error_if at the edge: no actions come out of a NaN context, NaN actions or NaN energy gradients."""
    model, context, _, padded, mask = setup
    valid = tuple(int(i) for i in np.argwhere(np.asarray(mask))[0])  # (example, token) of a valid token
    with pytest.raises(eqx.EquinoxRuntimeError, match="context is non-finite on valid tokens"):
        correct(model, _with(context, valid, np.nan), padded, mask)
    with pytest.raises(eqx.EquinoxRuntimeError, match="actions to correct are non-finite"):
        correct(model, context, _with(padded, (1, 2, 0), np.inf), mask)
    broken = eqx.tree_at(lambda m: m.attn_out.bias, model, np.full(model.attn_out.bias.shape, np.nan, np.float32))
    with pytest.raises(eqx.EquinoxRuntimeError, match="corrected actions are non-finite"):
        correct(broken, context, padded, mask)
    padding = tuple(int(i) for i in np.argwhere(~np.asarray(mask))[0])  # masked, yet 0 * NaN = NaN in attention
    with pytest.raises(eqx.EquinoxRuntimeError, match="corrected actions are non-finite"):
        correct(model, _with(context, padding, np.nan), padded, mask)
