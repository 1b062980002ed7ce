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
    infonce_sampled,
    mixed,
    noise_to_time,
    policy_ranking,
    policy_softmax,
    sample_negative_indices,
    shuffle_negatives,
    swap_negatives,
)
from eqx_energy.synthetic import synthetic_batch
from eqx_energy.train.config import LossConfig
from eqx_energy.train.step import energy_loss_fn

CFG = EnergyConfig(context_dim=32, action_dim=4, hidden=32, num_heads=4, output="softplus")
# Each check runs as one jitted program: run eagerly, every primitive compiles on its own (~0.1 s at -O0).
jit = eqx.filter_jit


def naive_infonce(model, context, actions, mask, tau):
    """Seed 002's form: b*b copies of the context, the whole model run on every pair."""
    b = actions.shape[0]
    ctx = jnp.repeat(context, b, axis=0)
    msk = jnp.repeat(mask, b, axis=0)
    act = jnp.tile(actions, (b, 1, 1))
    energies = jax.vmap(model)(ctx, act, msk).reshape(b, b)
    logits = jnp.clip(-energies / tau, -50, 50)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(b)))


@pytest.fixture(scope="module")
def model():
    """EnergyModel(CFG) at key 0, the model of every test here that does not need another."""
    return jit(EnergyModel)(CFG, key=jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    return jit(synthetic_batch)(jax.random.key(0), 8, valid_tokens=6)


def all_energies(model, context, actions, mask):
    """E(context_i, actions_j) for every pair: (b, b), one example at a time."""
    return candidate_energies(model, context, mask, jnp.broadcast_to(actions, (actions.shape[0], *actions.shape)))


@pytest.fixture(scope="module")
def naive_reference(model, batch):
    """The oracle, computed once: model, batch, naive loss and gradients."""
    loss, grads = jit(eqx.filter_value_and_grad(naive_infonce))(model, *batch, 0.5)
    return model, batch, loss, grads


@pytest.mark.parametrize("chunk", [None, 2, 4])
def test_factored_equals_naive_loss_and_grads(naive_reference, chunk):
    model, (context, actions, mask), ref, ref_grads = naive_reference
    loss_fn = lambda m, *batch: infonce_inbatch(m, *batch, tau=0.5, chunk=chunk)[0]  # noqa: E731
    loss, grads = jit(eqx.filter_value_and_grad(loss_fn))(model, context, actions, mask)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_metrics_keys_and_values(model, batch):
    loss, metrics = jit(infonce_inbatch)(model, *batch, tau=0.5)
    assert set(metrics) == set(METRIC_KEYS)
    b = batch[1].shape[0]
    energies = np.asarray(jit(all_energies)(model, *batch))
    off = ~np.eye(b, dtype=bool)
    np.testing.assert_allclose(metrics["e_pos"], np.diag(energies).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["e_neg"], energies[off].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["energy_std"], np.std(energies), rtol=1e-4)
    acc = np.mean(np.argmin(energies, axis=1) == np.arange(b))
    assert metrics["accuracy"] == pytest.approx(acc)
    assert metrics["logit_max"] == pytest.approx(float(-energies.min() / 0.5), rel=1e-5)


def test_logits_are_clamped(model, batch):
    _, metrics = jit(infonce_inbatch)(model, *batch, tau=1e-4)
    assert metrics["logit_min"] >= -50 and metrics["logit_max"] <= 50


def test_chunk_must_divide_batch(model, batch):
    with pytest.raises(ValueError, match="chunk"):
        infonce_inbatch(model, *batch, tau=0.5, chunk=3)


def test_negative_samplers(key, batch):
    _, actions, _ = batch
    shuffled = jit(shuffle_negatives)(key, actions, num=2)
    assert shuffled.shape == (8, 2, *actions.shape[1:])
    # a permutation of the chunk's steps: same rows, sorted
    np.testing.assert_allclose(np.sort(shuffled[3, 1], axis=0), np.sort(actions[3], axis=0))
    swapped = jit(swap_negatives)(actions, num=2)
    np.testing.assert_array_equal(swapped[0, 1], actions[2])
    np.testing.assert_array_equal(swapped[7, 0], actions[0])
    sampler = NegativeSampler(sigmas=[0.1, 0.5], num_shuffle=1, num_swap=1)
    negatives = jit(sampler)(key, actions)
    assert negatives.shape == (8, 4, *actions.shape[1:])
    noise = np.asarray(negatives[:, 1] - actions)
    assert 0.4 < noise.std() < 0.6


@jit
def explicit_losses(model, context, actions, mask, negatives):
    """Every loss over explicit negatives, with the energies they are made of."""
    e_pos = jax.vmap(model)(context, actions, mask)
    e_neg = jax.vmap(lambda c, n, m: jax.vmap(lambda a: model(c, a, m))(n))(context, negatives, mask)
    return {
        "e_pos": e_pos, "e_neg": e_neg,
        "infonce": infonce_explicit(model, context, actions, mask, negatives, tau=0.5),
        "hinge": hinge(model, context, actions, mask, negatives, margin=0.5),
        "mixed": mixed(model, context, actions, mask, negatives, tau=0.5, margin=0.5,
                       infonce_weight=1.0, margin_weight=0.3, diversity_weight=2.0, min_std=10.0),
        "inbatch": infonce_inbatch(model, context, actions, mask, tau=0.5),
    }


def test_explicit_infonce_hinge_and_mixed(key, model, batch):
    context, actions, mask = batch
    negatives = jit(NegativeSampler(sigmas=[0.3]))(key, actions)
    out = jax.tree.map(np.asarray, explicit_losses(model, context, actions, mask, negatives))
    e_pos, e_neg = out["e_pos"], out["e_neg"]

    loss, metrics = out["infonce"]
    logits = -np.concatenate([e_pos[:, None], e_neg], 1) / 0.5
    expected = -np.mean(_log_softmax(logits)[:, 0])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert set(METRIC_KEYS) <= set(metrics)

    margin_loss, hinge_metrics = out["hinge"]
    np.testing.assert_allclose(margin_loss, np.mean(np.maximum(0.5 + e_pos[:, None] - e_neg, 0.0)), rtol=1e-5)
    np.testing.assert_allclose(hinge_metrics["e_neg"], e_neg.mean(), rtol=1e-5)

    total, mixed_metrics = out["mixed"]
    nce, nce_metrics = out["inbatch"]
    expected_total = nce + 0.3 * margin_loss + 2.0 * (10.0 - nce_metrics["energy_std"])
    np.testing.assert_allclose(total, expected_total, rtol=1e-5)
    assert {"loss_infonce", "loss_margin", "loss_diversity"} <= set(mixed_metrics)


def test_hinge_prefers_low_positive_energy(key, model, batch):
    """The sign seed 004 got wrong: lowering E_pos must lower the hinge loss."""
    context, actions, mask = batch
    negatives = jit(NegativeSampler(sigmas=[1.0], num_shuffle=0, num_swap=0))(key, actions)

    @jit
    def grads(model, context, actions, mask, negatives):
        loss = jax.grad(lambda a: hinge(model, context, a, mask, negatives, margin=10.0)[0])(actions)
        energy = jax.grad(lambda a: jnp.sum(jax.vmap(model)(context, a, mask)))(actions)
        return loss, energy

    grad, e_grad = grads(model, context, actions, mask, negatives)
    # with a margin this large every term is active: d loss / d a_pos == dE_pos/da / b
    np.testing.assert_allclose(grad, e_grad / actions.shape[0], rtol=1e-4, atol=1e-7)


def test_dropout_key_changes_loss_only_when_training(key, model, batch):
    loss = jit(lambda *args, **kw: infonce_inbatch(*args, **kw)[0])
    base = loss(model, *batch, tau=0.5)
    assert loss(model, *batch, tau=0.5, key=key, inference=True) == base
    assert loss(model, *batch, tau=0.5, key=key, inference=False) != base


# ------------------------------------------------------------------ sampled in-batch negatives (issue 14)


@pytest.mark.parametrize("batch_size, num", [(2, 1), (5, 2), (8, 7), (16, 3)])
def test_sampled_negatives_are_distinct_others(batch_size, num):
    """Every row holds k distinct indices in [0, b), never its own, and over draws every other example shows up."""
    seen = np.zeros((batch_size, batch_size), bool)
    draw = jax.jit(sample_negative_indices, static_argnums=(1, 2))
    for seed in range(60):  # P(a pair is never drawn) <= (1 - 3/15)^60 ~ 2e-6 for the sparsest case
        index = np.asarray(draw(jax.random.key(seed), batch_size, num))
        assert index.shape == (batch_size, num) and index.dtype == np.int32
        assert ((index >= 0) & (index < batch_size)).all()
        assert not (index == np.arange(batch_size)[:, None]).any()
        assert all(len(set(row)) == num for row in index)
        seen[np.arange(batch_size)[:, None], index] = True
    np.testing.assert_array_equal(seen, ~np.eye(batch_size, dtype=bool))
    for bad in (0, batch_size):
        with pytest.raises(ValueError, match="num_negatives"):
            sample_negative_indices(jax.random.key(0), batch_size, bad)


def test_sampled_with_all_others_equals_inbatch_and_naive(naive_reference):
    """k = b - 1 in a fixed scrambled order: the same loss and gradients as the naive b² form."""
    model, (context, actions, mask), ref, ref_grads = naive_reference
    b = actions.shape[0]
    offsets = np.asarray([3, 6, 1, 5, 2, 7, 4])  # a fixed permutation of 1..b-1
    index = jnp.asarray((np.arange(b)[:, None] + offsets[None, :]) % b, jnp.int32)
    loss_fn = lambda m, *batch: infonce_sampled(m, *batch, tau=0.5)  # noqa: E731
    (loss, metrics), grads = jit(eqx.filter_value_and_grad(loss_fn, has_aux=True))(model, context, actions, mask, index)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    full = jit(infonce_inbatch)(model, context, actions, mask, tau=0.5)[1]
    for name in METRIC_KEYS:
        np.testing.assert_allclose(metrics[name], full[name], rtol=1e-5, err_msg=name)


def test_sampled_loss_scores_only_the_drawn_pairs(model, batch):
    """k < b - 1: the CE over [E_ii, E_i n_i1..k] taken from the full pairwise matrix."""
    context, actions, mask = batch
    index = jit(sample_negative_indices)(jax.random.key(5), actions.shape[0], 3)
    loss, metrics = jit(infonce_sampled)(model, context, actions, mask, index, tau=0.5)
    energies = np.asarray(jit(all_energies)(model, *batch))
    rows = np.arange(actions.shape[0])[:, None]
    picked = np.concatenate([energies[rows, rows], energies[rows, np.asarray(index)]], axis=1)
    logits = -picked / 0.5
    expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["e_neg"], picked[:, 1:].mean(), rtol=1e-5)
    assert metrics["accuracy"] == pytest.approx(np.mean(picked.argmin(1) == 0))


def test_step_loss_with_num_negatives(key, model, batch):
    """loss.num_negatives routes the step's in-batch loss through sampled negatives: with k = b - 1 it is
    the full loss (dropout on, same keys), with fewer it differs; the config rejects k with other kinds."""

    @jit
    def losses(model, batch, key):
        return [energy_loss_fn(LossConfig(num_negatives=k))(model, *batch, key)[0] for k in (None, 7, 2)]

    full, all_others, two = losses(model, batch, key)
    np.testing.assert_allclose(all_others, full, rtol=1e-5)
    assert abs(float(two - full)) > 1e-3
    for bad in ({"num_negatives": 0}, {"num_negatives": 2, "kind": "hinge"}, {"num_negatives": 2, "chunk": 4}):
        with pytest.raises(ValueError, match="num_negatives"):
            LossConfig(**bad)


def test_sampled_loss_rejects_the_positive_among_negatives(model, batch):
    index = jnp.zeros((batch[1].shape[0], 2), jnp.int32).at[:, 1].set(1)  # row 0 holds 0, row 1 holds 1
    with pytest.raises(Exception, match="own index"):
        infonce_sampled(model, *batch, index, tau=0.5)


def test_sampled_and_pooled_gradients_match_central_differences(key):
    """d loss / d params along a random direction vs central differences (f64), with context pooling on:
    the two new paths together on a tiny case (b=4, k=2, L=3)."""
    cfg = dataclasses.replace(CFG, context_latents=3, hidden=16)
    context, actions, mask = jit(synthetic_batch)(key, 4, valid_tokens=6)
    actions = jax.random.normal(jax.random.fold_in(key, 7), actions.shape)  # off the ReLU kinks of the ramps
    index = jit(sample_negative_indices)(jax.random.key(1), 4, 2)
    model = jit(EnergyModel)(cfg, key=key)
    jax.config.update("jax_enable_x64", True)
    try:
        to64 = lambda x: jnp.asarray(np.asarray(x, np.float64)) if eqx.is_inexact_array(x) else x  # noqa: E731
        model, context, actions = jax.tree.map(to64, (model, context, actions))
        params, static = eqx.partition(model, eqx.is_inexact_array)
        loss = jax.jit(lambda p: infonce_sampled(eqx.combine(p, static), context, actions, mask, index, tau=0.5)[0])
        grads = jax.jit(jax.grad(loss))(params)
        leaves, treedef = jax.tree.flatten(params)
        grad_leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
        rng = np.random.default_rng(0)
        for _ in range(3):  # on the host in f64: every jax op run eagerly would compile on its own
            direction = [rng.normal(size=x.shape) for x in leaves]
            eps = 1e-6
            shifted = lambda sign: jax.tree.unflatten(treedef, [p + sign * eps * d for p, d in zip(leaves, direction)])  # noqa: E731
            fd = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps)
            analytic = sum(np.sum(g * d) for g, d in zip(grad_leaves, direction))
            np.testing.assert_allclose(analytic, fd, rtol=1e-6)
        pooling_grad = jnp.abs(grads.pooling.latents).max()
        assert pooling_grad > 1e-6  # the latents are trained through the pairwise scores
    finally:
        jax.config.update("jax_enable_x64", False)


# ------------------------------------------------------------------ policy-sample candidates


@pytest.fixture(scope="module")
def candidates_reference():
    """Model, batch, 5 'policy samples' per frame at growing distances, every candidate's energy
    from the model's plain __call__ (one example each), and the distances (numpy)."""
    key = jax.random.key(3)
    model = jit(EnergyModel)(CFG, key=key)
    context, actions, mask = jit(synthetic_batch)(key, 6, valid_tokens=6)
    scales = np.array([0.05, 0.1, 0.3, 0.6, 1.0])[None, :, None, None]
    noise = jax.jit(jax.random.normal, static_argnums=1)(jax.random.key(4), (6, 5, *actions.shape[1:]))
    samples = jnp.asarray(np.asarray(actions)[:, None] + scales * np.asarray(noise), jnp.float32)
    cands = np.concatenate([np.asarray(actions)[:, None], np.asarray(samples)], axis=1)
    energies = np.asarray(jit(candidate_energies)(model, context, mask, jnp.asarray(cands)))
    distances = np.sum((cands - np.asarray(actions)[:, None]) ** 2, axis=(2, 3))
    return model, (context, actions, mask), samples, energies, distances


def candidate_energies(model, context, mask, candidates, t=None):
    """E(context_i, candidate_ij[, t_i]) one example at a time: (b, m)."""
    per_frame = lambda c, m, row, ti: jax.vmap(lambda a: model(c, a, m, ti))(row)  # noqa: E731
    return jax.vmap(per_frame, in_axes=(0, 0, 0, None if t is None else 0))(context, mask, candidates, t)


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("beta", [0.5, 5.0])
def test_policy_softmax_matches_numpy(candidates_reference, beta):
    model, (context, actions, mask), samples, energies, distances = candidates_reference
    tau = 0.3
    loss, metrics = jit(policy_softmax)(model, context, actions, mask, samples, tau=tau, beta=beta)
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
    loss, metrics = jit(policy_ranking)(model, context, actions, mask, samples, tau=tau, weighted=weighted)
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
    eps = np.asarray(jax.jit(jax.random.normal, static_argnums=1)(key, samples.shape))
    t = np.array([0.0, 1.0, 0.25, 0.5, 0.75, 0.1], np.float32)
    noised = jit(noise_to_time)(key, samples, jnp.asarray(t))
    expected = t[:, None, None, None] * eps + (1 - t[:, None, None, None]) * np.asarray(samples)
    np.testing.assert_allclose(noised, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(noised[0], samples[0])


def test_noised_policy_softmax_matches_numpy(candidates_reference):
    """With t, every candidate of frame i is noised to t_i (noise from the key's first half) and the
    time-conditioned energy scores it at t_i; the targets stay those of the clean chunks."""
    _, (context, actions, mask), samples, _, distances = candidates_reference
    model = jit(EnergyModel)(dataclasses.replace(CFG, time_conditioning=True, dropout=0.0), key=jax.random.key(5))
    t = jnp.linspace(0.0, 0.9, actions.shape[0])
    key = jax.random.key(6)
    loss, _ = jit(policy_softmax)(model, context, actions, mask, samples, tau=0.3, beta=1.0, t=t, key=key)

    @jit
    def energies_of_noised(model, context, actions, mask, samples, t, key):
        cands = jnp.concatenate([actions[:, None], samples], axis=1)
        return candidate_energies(model, context, mask, noise_to_time(jax.random.split(key)[0], cands, t), t)

    energies = np.asarray(energies_of_noised(model, context, actions, mask, samples, t, key))
    targets = np.exp(_log_softmax(-1.0 * distances))
    expected = -np.mean(np.sum(targets * _log_softmax(-energies / 0.3), axis=1))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    clean, _ = jit(policy_softmax)(model, context, actions, mask, samples, tau=0.3, beta=1.0, key=key)
    assert float(clean) != pytest.approx(float(loss))
