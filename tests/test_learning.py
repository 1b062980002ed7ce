"""End to end on the synthetic task: InfoNCE learns, and correction repairs perturbed chunks."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eqx_energy import CorrectionConfig, EnergyConfig, EnergyModel
from eqx_energy.correct import correct
from eqx_energy.losses import infonce_inbatch
from eqx_energy.synthetic import synthetic_batch


def test_infonce_learns_and_correction_reduces_mse():
    key = jax.random.key(0)
    cfg = EnergyConfig(context_dim=32, action_dim=4, hidden=64, num_heads=4, output="softplus", dropout=0.0)
    model = EnergyModel(cfg, key=key)
    optimizer = optax.adamw(3e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, key):
        batch = synthetic_batch(key, 32, valid_tokens=6)
        loss_fn = lambda m: infonce_inbatch(m, *batch, tau=0.5)  # noqa: E731
        (loss, metrics), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, metrics

    for i in range(120):
        model, opt_state, metrics = step(model, opt_state, jax.random.fold_in(key, i))

    context, actions, mask = synthetic_batch(jax.random.key(99), 32, valid_tokens=6)
    _, held_out = infonce_inbatch(model, context, actions, mask, tau=0.5)
    assert held_out["accuracy"] > 0.5  # chance is 1/32
    assert held_out["e_pos"] < held_out["e_neg"]

    noisy = actions + 0.3 * jax.random.normal(jax.random.key(5), actions.shape)
    fixed, trace = correct(model, context, noisy, mask, CorrectionConfig(steps=5, alpha=0.05, clip_frac=0.2))
    mse_before = float(jnp.mean((noisy - actions) ** 2))
    mse_after = float(jnp.mean((fixed - actions) ** 2))
    assert np.mean(trace.energy[-1]) < np.mean(trace.energy[0])
    assert mse_after < 0.9 * mse_before
