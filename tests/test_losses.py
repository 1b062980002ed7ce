import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqx_energy import EnergyConfig, EnergyModel
from eqx_energy.losses import (
    METRIC_KEYS,
    NegativeSampler,
    hinge,
    infonce_explicit,
    infonce_inbatch,
    mixed,
    noise_to_time,
    policy_ranking,
    policy_softmax,
    shuffle_negatives,
    swap_negatives,
)
from eqx_energy.synthetic import synthetic_batch

CFG = EnergyConfig(context_dim=32, action_dim=4, hidden=32, num_heads=4, output="softplus")


def naive_infonce(model, context, actions, mask, tau):
    """Seed 002's form: b*b copies of the context, the whole model run on every pair."""
    b = actions.shape[0]
    ctx = jnp.repeat(context, b, axis=0)
    msk = jnp.repeat(mask, b, axis=0)
    act = jnp.tile(actions, (b, 1, 1))
    energies = jax.vmap(model)(ctx, act, msk).reshape(b, b)
    logits = jnp.clip(-energies / tau, -50, 50)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(b)))


@pytest.fixture
def batch(key):
    return synthetic_batch(key, 8, valid_tokens=6)


@pytest.fixture(scope="module")
def naive_reference():
    """The oracle, computed once: model, batch, naive loss and gradients."""
    key = jax.random.key(0)
    model = EnergyModel(CFG, key=key)
    context, actions, mask = synthetic_batch(key, 8, valid_tokens=6)
    naive_fn = lambda m: naive_infonce(m, context, actions, mask, 0.5)  # noqa: E731
    loss, grads = eqx.filter_value_and_grad(naive_fn)(model)
    return model, (context, actions, mask), loss, grads


@pytest.mark.parametrize("chunk", [None, 2, 4])
def test_factored_equals_naive_loss_and_grads(naive_reference, chunk):
    model, (context, actions, mask), ref, ref_grads = naive_reference
    loss_fn = lambda m: infonce_inbatch(m, context, actions, mask, tau=0.5, chunk=chunk)[0]  # noqa: E731
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_metrics_keys_and_values(key, batch):
    model = EnergyModel(CFG, key=key)
    context, actions, mask = batch
    loss, metrics = infonce_inbatch(model, context, actions, mask, tau=0.5)
    assert set(metrics) == set(METRIC_KEYS)
    b = actions.shape[0]
    energies = jax.vmap(lambda c, m: jax.vmap(lambda a: model(c, a, m))(actions))(context, mask)
    off = ~np.eye(b, dtype=bool)
    np.testing.assert_allclose(metrics["e_pos"], np.diag(energies).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["e_neg"], np.asarray(energies)[off].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["energy_std"], np.std(energies), rtol=1e-4)
    acc = np.mean(np.argmin(np.asarray(energies), axis=1) == np.arange(b))
    assert metrics["accuracy"] == pytest.approx(acc)
    assert metrics["logit_max"] == pytest.approx(float(-energies.min() / 0.5), rel=1e-5)


def test_logits_are_clamped(key, batch):
    model = EnergyModel(CFG, key=key)
    context, actions, mask = batch
    _, metrics = infonce_inbatch(model, context, actions, mask, tau=1e-4)
    assert metrics["logit_min"] >= -50 and metrics["logit_max"] <= 50


def test_chunk_must_divide_batch(key, batch):
    model = EnergyModel(CFG, key=key)
    with pytest.raises(ValueError, match="chunk"):
        infonce_inbatch(model, *batch, tau=0.5, chunk=3)


def test_negative_samplers(key, batch):
    _, actions, _ = batch
    shuffled = shuffle_negatives(key, actions, num=2)
    assert shuffled.shape == (8, 2, *actions.shape[1:])
    # a permutation of the chunk's steps: same rows, sorted
    np.testing.assert_allclose(np.sort(shuffled[3, 1], axis=0), np.sort(actions[3], axis=0))
    swapped = swap_negatives(actions, num=2)
    np.testing.assert_array_equal(swapped[0, 1], actions[2])
    np.testing.assert_array_equal(swapped[7, 0], actions[0])
    sampler = NegativeSampler(sigmas=[0.1, 0.5], num_shuffle=1, num_swap=1)
    negatives = sampler(key, actions)
    assert negatives.shape == (8, 4, *actions.shape[1:])
    noise = np.asarray(negatives[:, 1] - actions)
    assert 0.4 < noise.std() < 0.6


def test_explicit_infonce_hinge_and_mixed(key, batch):
    model = EnergyModel(CFG, key=key)
    context, actions, mask = batch
    negatives = NegativeSampler(sigmas=[0.3])(key, actions)
    e_pos = jax.vmap(model)(context, actions, mask)
    e_neg = jax.vmap(lambda c, n, m: jax.vmap(lambda a: model(c, a, m))(n))(context, negatives, mask)

    loss, metrics = infonce_explicit(model, context, actions, mask, negatives, tau=0.5)
    logits = -jnp.concatenate([e_pos[:, None], e_neg], 1) / 0.5
    expected = -jnp.mean(jax.nn.log_softmax(logits)[:, 0])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert set(METRIC_KEYS) <= set(metrics)

    margin_loss, hinge_metrics = hinge(model, context, actions, mask, negatives, margin=0.5)
    np.testing.assert_allclose(margin_loss, jnp.mean(jax.nn.relu(0.5 + e_pos[:, None] - e_neg)), rtol=1e-5)
    np.testing.assert_allclose(hinge_metrics["e_neg"], e_neg.mean(), rtol=1e-5)

    total, mixed_metrics = mixed(
        model, context, actions, mask, negatives, tau=0.5, margin=0.5,
        infonce_weight=1.0, margin_weight=0.3, diversity_weight=2.0, min_std=10.0,
    )
    nce, nce_metrics = infonce_inbatch(model, context, actions, mask, tau=0.5)
    expected_total = nce + 0.3 * margin_loss + 2.0 * (10.0 - nce_metrics["energy_std"])
    np.testing.assert_allclose(total, expected_total, rtol=1e-5)
    assert {"loss_infonce", "loss_margin", "loss_diversity"} <= set(mixed_metrics)


def test_hinge_prefers_low_positive_energy(key, batch):
    """The sign seed 004 got wrong: lowering E_pos must lower the hinge loss."""
    model = EnergyModel(CFG, key=key)
    context, actions, mask = batch
    negatives = NegativeSampler(sigmas=[1.0], num_shuffle=0, num_swap=0)(key, actions)
    grad = jax.grad(lambda a: hinge(model, context, a, mask, negatives, margin=10.0)[0])(actions)
    e_grad = jax.grad(lambda a: jnp.sum(jax.vmap(model)(context, a, mask)))(actions)
    # with a margin this large every term is active: d loss / d a_pos == dE_pos/da / b
    np.testing.assert_allclose(grad, e_grad / actions.shape[0], rtol=1e-4, atol=1e-7)


def test_dropout_key_changes_loss_only_when_training(key, batch):
    model = EnergyModel(CFG, key=key)
    base = infonce_inbatch(model, *batch, tau=0.5)[0]
    assert infonce_inbatch(model, *batch, tau=0.5, key=key, inference=True)[0] == base
    assert infonce_inbatch(model, *batch, tau=0.5, key=key, inference=False)[0] != base


# ------------------------------------------------------------------ policy-sample candidates


@pytest.fixture(scope="module")
def candidates_reference():
    """Model, batch, 5 'policy samples' per frame at growing distances, every candidate's energy
    from the model's plain __call__ (one example each), and the distances (numpy)."""
    key = jax.random.key(3)
    model = EnergyModel(CFG, key=key)
    context, actions, mask = synthetic_batch(key, 6, valid_tokens=6)
    scales = jnp.array([0.05, 0.1, 0.3, 0.6, 1.0])[None, :, None, None]
    samples = actions[:, None] + scales * jax.random.normal(jax.random.key(4), (6, 5, *actions.shape[1:]))
    cands = np.concatenate([np.asarray(actions)[:, None], np.asarray(samples)], axis=1)
    per_frame = lambda c, m, row: jax.vmap(lambda a: model(c, a, m))(row)  # noqa: E731
    energies = np.asarray(jax.vmap(per_frame)(context, mask, jnp.asarray(cands)))
    distances = np.sum((cands - np.asarray(actions)[:, None]) ** 2, axis=(2, 3))
    return model, (context, actions, mask), samples, energies, distances


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("beta", [0.5, 5.0])
def test_policy_softmax_matches_numpy(candidates_reference, beta):
    model, (context, actions, mask), samples, energies, distances = candidates_reference
    tau = 0.3
    loss, metrics = policy_softmax(model, context, actions, mask, samples, tau=tau, beta=beta)
    targets = np.exp(_log_softmax(-beta * distances))
    expected = -np.mean(np.sum(targets * _log_softmax(-energies / tau), axis=1))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert set(METRIC_KEYS) <= set(metrics)
    np.testing.assert_allclose(metrics["e_pos"], energies[:, 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["e_neg"], energies[:, 1:].mean(), rtol=1e-5)
    assert metrics["accuracy"] == pytest.approx(np.mean(energies.argmin(1) == 0))
    pick = energies[:, 1:].argmin(1)
    assert metrics["select_agreement"] == pytest.approx(np.mean(pick == distances[:, 1:].argmin(1)))
    chunk = actions.shape[1] * actions.shape[2]
    picked = distances[np.arange(6), 1 + pick]
    np.testing.assert_allclose(metrics["select_mse"], picked.mean() / chunk, rtol=1e-5)
    np.testing.assert_allclose(metrics["sample_mse"], distances[:, 1:].mean() / chunk, rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_policy_ranking_matches_numpy(candidates_reference, weighted):
    model, (context, actions, mask), samples, energies, distances = candidates_reference
    tau = 0.3
    loss, metrics = policy_ranking(model, context, actions, mask, samples, tau=tau, weighted=weighted)
    total, weight = 0.0, 0.0
    for i in range(energies.shape[0]):
        for j in range(energies.shape[1]):
            for k in range(energies.shape[1]):
                if distances[i, j] < distances[i, k]:
                    w = distances[i, k] - distances[i, j] if weighted else 1.0
                    total += w * -np.log(1.0 / (1.0 + np.exp(-(energies[i, k] - energies[i, j]) / tau)))
                    weight += w
    np.testing.assert_allclose(loss, total / weight, rtol=1e-5)
    assert set(METRIC_KEYS) <= set(metrics)


def test_noise_to_time_interpolates_noise_and_chunk(key, candidates_reference):
    _, (_, actions, _), samples, _, _ = candidates_reference
    eps = jax.random.normal(key, samples.shape)
    t = jnp.array([0.0, 1.0, 0.25, 0.5, 0.75, 0.1])
    noised = noise_to_time(key, samples, t)
    expected = t[:, None, None, None] * eps + (1 - t[:, None, None, None]) * samples
    np.testing.assert_allclose(noised, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(noised[0], samples[0])


def test_noised_policy_softmax_matches_numpy(candidates_reference):
    """With t, every candidate of frame i is noised to t_i (noise from the key's first half) and the
    time-conditioned energy scores it at t_i; the targets stay those of the clean chunks."""
    _, (context, actions, mask), samples, _, distances = candidates_reference
    model = EnergyModel(dataclasses.replace(CFG, time_conditioning=True, dropout=0.0), key=jax.random.key(5))
    t = jnp.linspace(0.0, 0.9, actions.shape[0])
    key = jax.random.key(6)
    loss, _ = policy_softmax(model, context, actions, mask, samples, tau=0.3, beta=1.0, t=t, key=key)
    cands = jnp.concatenate([actions[:, None], samples], axis=1)
    noised = noise_to_time(jax.random.split(key)[0], cands, t)
    per_frame = lambda c, m, row, ti: jax.vmap(lambda a: model(c, a, m, ti))(row)  # noqa: E731
    energies = np.asarray(jax.vmap(per_frame)(context, mask, noised, t))
    targets = np.exp(_log_softmax(-1.0 * distances))
    expected = -np.mean(np.sum(targets * _log_softmax(-energies / 0.3), axis=1))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    clean, _ = policy_softmax(model, context, actions, mask, samples, tau=0.3, beta=1.0, key=key)
    assert float(clean) != pytest.approx(float(loss))
