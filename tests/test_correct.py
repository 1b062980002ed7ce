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


@pytest.fixture
def setup(key):
    model = EnergyModel(CFG, key=key)
    context, actions, mask = synthetic_batch(key, 4, valid_tokens=6)
    padded = jnp.concatenate([actions, jax.random.normal(key, (*actions.shape[:2], PADDED - 4))], -1)
    return model, context, actions, padded, mask


def test_energy_and_grad_matches_central_differences(setup, key):
    model, context, _, _, mask = setup
    # generic actions: the synthetic ramps sit on a ReLU kink of this random model (one-sided slopes differ)
    actions = jax.random.normal(jax.random.fold_in(key, 7), (4, 8, 4))
    energies, grads = energy_and_grad(model, context, actions, mask)
    np.testing.assert_allclose(energies, jax.vmap(model)(context, actions, mask), rtol=1e-6)
    # The oracle runs in f64 (ReLU kinks and f32 round-off make f32 differences unreliable).
    jax.config.update("jax_enable_x64", True)
    try:
        to64 = lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x  # noqa: E731
        model64, context64, actions64 = jax.tree.map(to64, (model, context, actions))
        _, grads64 = energy_and_grad(model64, context64, actions64, mask)
        rng = np.random.default_rng(0)
        eps = 1e-8
        for b in range(actions.shape[0]):
            direction = jnp.asarray(rng.normal(size=actions.shape[1:]))
            e = lambda a: model64(context64[b], a, mask[b])  # noqa: E731
            fd = (e(actions64[b] + eps * direction) - e(actions64[b] - eps * direction)) / (2 * eps)
            np.testing.assert_allclose(jnp.sum(grads64[b] * direction), fd, rtol=1e-5, atol=1e-9)
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
    np.testing.assert_allclose(trace.energy[0], jax.vmap(model)(context, padded[..., :4], mask), rtol=1e-6)
    np.testing.assert_allclose(trace.energy[-1], jax.vmap(model)(context, new[..., :4], mask), rtol=1e-6)
    assert np.all(np.diff(np.asarray(trace.energy), axis=0) <= 1e-7)
    assert np.all(trace.energy[-1] < trace.energy[0])


def test_clip_bound_holds_exactly(setup):
    model, context, _, padded, mask = setup
    cfg = CorrectionConfig(steps=3, alpha=100.0, clip_frac=0.05)
    new, trace = correct(model, context, padded, mask, cfg)
    assert np.all(trace.clipped)
    # first step: ||a1 - a0|| == clip_frac * ||a0|| per example
    one, _ = correct(model, context, padded, mask, CorrectionConfig(steps=1, alpha=100.0, clip_frac=0.05))
    moved = np.linalg.norm(np.asarray(one - padded).reshape(4, -1), axis=1)
    limit = 0.05 * np.linalg.norm(np.asarray(padded[..., :4]).reshape(4, -1), axis=1)
    np.testing.assert_allclose(moved, limit, rtol=1e-5)
    np.testing.assert_allclose(trace.step_norm[0], limit, rtol=1e-5)


def test_clip_floor_lets_zero_actions_move(setup):
    model, context, _, _, mask = setup
    zeros = jnp.zeros((4, 8, 4))
    new, trace = correct(model, context, zeros, mask, CorrectionConfig(steps=1, alpha=10.0, clip_floor=0.01))
    norms = np.linalg.norm(np.asarray(new).reshape(4, -1), axis=1)
    np.testing.assert_allclose(norms, 0.01, rtol=1e-5)


def test_padding_and_first_only_untouched_bit_identical(setup):
    model, context, _, padded, mask = setup
    new, _ = correct(model, context, padded, mask, CorrectionConfig(steps=3))
    np.testing.assert_array_equal(new[..., 4:], padded[..., 4:])
    assert not np.array_equal(new[..., :4], padded[..., :4])
    first, _ = correct(model, context, padded, mask, CorrectionConfig(steps=3, first_only=True))
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
        correct(model, context, padded[..., :2], mask, CorrectionConfig())
    with pytest.raises(ValueError, match="steps"):
        CorrectionConfig(steps=-1)


def test_non_finite_context_actions_or_result_stop_correction(setup):
    """error_if at the edge: no actions come out of a NaN context, NaN actions or NaN energy gradients."""
    model, context, _, padded, mask = setup
    valid = tuple(int(i) for i in np.argwhere(np.asarray(mask))[0])  # (example, token) of a valid token
    with pytest.raises(eqx.EquinoxRuntimeError, match="context is non-finite on valid tokens"):
        correct(model, context.at[valid].set(jnp.nan), padded, mask)
    with pytest.raises(eqx.EquinoxRuntimeError, match="actions to correct are non-finite"):
        correct(model, context, padded.at[1, 2, 0].set(jnp.inf), mask)
    broken = eqx.tree_at(lambda m: m.attn_out.bias, model, jnp.full_like(model.attn_out.bias, jnp.nan))
    with pytest.raises(eqx.EquinoxRuntimeError, match="corrected actions are non-finite"):
        correct(broken, context, padded, mask)
    padding = tuple(int(i) for i in np.argwhere(~np.asarray(mask))[0])  # masked, yet 0 * NaN = NaN in attention
    with pytest.raises(eqx.EquinoxRuntimeError, match="corrected actions are non-finite"):
        correct(model, context.at[padding].set(jnp.nan), padded, mask)
