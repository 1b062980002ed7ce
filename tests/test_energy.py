import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_energy import EnergyConfig, EnergyModel
from eqx_energy.energy import MLPResNet, sinusoidal_encoding

CFG = EnergyConfig(context_dim=12, action_dim=3, hidden=16, num_heads=4, dropout=0.2)


def _inputs(key, s=6, h=5, valid=4):
    kc, ka = jax.random.split(key)
    context = jax.random.normal(kc, (s, CFG.context_dim))
    actions = jax.random.normal(ka, (h, CFG.action_dim))
    return context, actions, jnp.arange(s) < valid


def test_returns_f32_scalar_and_mean_of_per_step(key):
    model = EnergyModel(CFG, key=key)
    context, actions, mask = _inputs(key)
    energy = model(context, actions, mask)
    steps = model.per_step(context, actions, mask)
    assert energy.shape == () and energy.dtype == jnp.float32
    assert steps.shape == (5,)
    np.testing.assert_allclose(energy, steps.mean(), rtol=1e-6)
    np.testing.assert_allclose(model.score(model.encode_context(context, mask), actions), energy, rtol=1e-6)


def test_matches_independent_numpy_reference(key):
    """The whole forward pass recomputed with numpy from the parameters (DESIGN's math)."""
    model = EnergyModel(CFG, key=key)
    context, actions, mask = _inputs(key)
    p = jax.tree.map(np.asarray, model)

    def layer_norm(x, ln):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * ln.weight + ln.bias

    def linear(x, lin):
        return x @ lin.weight.T + lin.bias

    def resnet(x, net):
        x = np.maximum(linear(layer_norm(x, net.in_norm), net.inp), 0)
        for block in net.blocks:
            x = x + np.maximum(linear(layer_norm(x, block.norm), block.linear), 0)
        return linear(layer_norm(x, net.out_norm), net.out)

    c, a, m = np.asarray(context), np.asarray(actions), np.asarray(mask)
    h, d, heads = a.shape[0], CFG.hidden, CFG.num_heads
    pos = np.arange(h)[:, None]
    div = np.exp(np.arange(0, d, 2) * (-math.log(10000.0) / d))
    pe = np.zeros((h, d))
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    ctx = resnet(c, p.context_proj)
    q = linear(resnet(a, p.action_proj) + pe, p.query).reshape(h, heads, -1)
    k = linear(ctx, p.key_proj).reshape(len(c), heads, -1)
    v = linear(ctx, p.value).reshape(len(c), heads, -1)
    logits = np.einsum("hnd,snd->nhs", q, k) / np.sqrt(d // heads)
    logits = np.where(m, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    z = linear(np.einsum("nhs,snd->hnd", w, v).reshape(h, d), p.attn_out)
    raw = resnet(z, p.head)[:, 0]
    expected = (2.0 / (1 + np.exp(-0.5 * raw)) + 0.1).mean()
    np.testing.assert_allclose(model(context, actions, mask), expected, rtol=1e-5)


def test_masked_tokens_have_no_influence(key):
    model = EnergyModel(CFG, key=key)
    context, actions, mask = _inputs(key)
    junk = context.at[~mask].set(1e3)
    assert model(junk, actions, mask) == model(context, actions, mask)
    grads = jax.grad(lambda c: model(c, actions, mask))(context)
    assert np.all(np.asarray(grads)[~np.asarray(mask)] == 0)


def test_fully_masked_context_is_finite(key):
    model = EnergyModel(CFG, key=key)
    context, actions, _ = _inputs(key)
    none = jnp.zeros(context.shape[0], bool)
    energy, grad = jax.value_and_grad(lambda a: model(context, a, none))(actions)
    assert np.isfinite(energy) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", ["sigmoid", "softplus", "identity"])
def test_output_transforms(key, name):
    cfg = EnergyConfig(context_dim=12, action_dim=3, hidden=16, num_heads=4, output=name)
    model = EnergyModel(cfg, key=key)
    context, actions, mask = _inputs(key)
    energies = model.per_step(context, actions, mask)
    if name == "sigmoid":
        assert np.all((energies > 0.1) & (energies < 2.1))
    if name == "softplus":
        assert np.all(energies > 1e-3)
    # identity is affine in the head's raw output: dE/da is never killed by a ReLU
    grad = jax.grad(lambda a: model(context, a, mask))(actions)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_dropout_only_with_key_and_training(key):
    model = EnergyModel(CFG, key=key)
    context, actions, mask = _inputs(key)
    base = model(context, actions, mask)
    assert model(context, actions, mask, key=key, inference=True) == base
    assert model(context, actions, mask, key=None, inference=False) == base
    assert model(context, actions, mask, key=key, inference=False) != base


def test_bf16_context_is_cast_once(key):
    model = EnergyModel(CFG, key=key)
    context, actions, mask = _inputs(key)
    energy = model(context.astype(jnp.bfloat16), actions, mask)
    assert energy.dtype == jnp.float32


def test_shape_errors_name_the_problem(key):
    model = EnergyModel(CFG, key=key)
    context, actions, mask = _inputs(key)
    with pytest.raises(ValueError, match="action_dim"):
        model(context, jnp.zeros((5, 7)), mask)
    with pytest.raises(ValueError, match="context_dim"):
        model(jnp.zeros((6, 5)), actions, mask)
    with pytest.raises(ValueError, match="max_horizon"):
        EnergyModel(EnergyConfig(12, 3, 16, 4, max_horizon=2), key=key)(context, actions, mask)
    with pytest.raises(ValueError, match="divisible"):
        EnergyConfig(12, 3, hidden=10, num_heads=4)
    with pytest.raises((ValueError, TypeError), match="output"):  # TypeError: the jaxtyping hook
        EnergyConfig(12, 3, output="relu")


def test_mlp_resnet_and_position_encoding_shapes(key):
    net = MLPResNet(2, 5, 8, 1, key=key)
    assert net(jnp.ones(5)).shape == (1,) and len(net.blocks) == 2
    pe = sinusoidal_encoding(4, 6)
    np.testing.assert_allclose(pe[0], [0, 1, 0, 1, 0, 1], atol=1e-7)
    np.testing.assert_allclose(pe[3, 0], np.sin(3.0), rtol=1e-6)


def test_time_conditioning_off_keeps_the_seed_parameter_tree(key):
    """Without the option there are no time weights: the leaves (paths, shapes, values) are those of a
    time-conditioned model less `time_proj`, so seed-format checkpoints load as before."""
    off = EnergyModel(CFG, key=key)
    on = EnergyModel(dataclasses.replace(CFG, time_conditioning=True), key=key)
    leaves = lambda m: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(m)}
    off_leaves, on_leaves = leaves(off), leaves(on)
    assert off.time_proj is None
    assert set(on_leaves) - set(off_leaves) == {".time_proj.weight", ".time_proj.bias"}
    assert set(off_leaves) <= set(on_leaves)
    for name, value in off_leaves.items():
        np.testing.assert_array_equal(value, on_leaves[name])
    context, actions, mask = _inputs(key)
    with pytest.raises(ValueError, match="time_conditioning"):
        off(context, actions, mask, 0.5)


def test_time_conditioned_energy_depends_on_t(key):
    model = EnergyModel(dataclasses.replace(CFG, time_conditioning=True), key=key)
    context, actions, mask = _inputs(key)
    clean = model(context, actions, mask)
    assert model(context, actions, mask, 0.0) == clean  # t=None means t=0 (clean)
    assert abs(float(model(context, actions, mask, 0.7)) - float(clean)) > 1e-4
    enc = model.encode_context(context, mask)
    np.testing.assert_allclose(model.score(enc, actions, jnp.float32(0.7)), model(context, actions, mask, 0.7), rtol=1e-6)
    scores = jax.vmap(lambda t: model.score(enc, actions, t))(jnp.asarray([0.0, 0.7]))
    np.testing.assert_allclose(scores, [clean, model(context, actions, mask, 0.7)], rtol=1e-6)


def test_action_input_norm_off_sees_the_scale_and_offset_of_each_step(key):
    """The seed's input LayerNorm over the action dims makes E invariant to a_t -> s a_t + m per step;
    `action_input_norm=False` removes that blindness and keeps the parameter tree."""
    context, actions, mask = _inputs(key)
    seed_format = EnergyModel(CFG, key=key)
    raw = EnergyModel(dataclasses.replace(CFG, action_input_norm=False), key=key)
    moved = 3.0 * actions + 0.7
    np.testing.assert_allclose(seed_format(context, moved, mask), seed_format(context, actions, mask), rtol=1e-5)
    assert abs(float(raw(context, moved, mask)) - float(raw(context, actions, mask))) > 1e-3
    assert jax.tree.structure(jax.tree.leaves(seed_format)) == jax.tree.structure(jax.tree.leaves(raw))
    for x, y in zip(jax.tree.leaves(seed_format), jax.tree.leaves(raw)):
        np.testing.assert_array_equal(x, y)


def test_context_latents_off_keeps_the_seed_parameter_tree_and_outputs(key):
    """Without pooling the model is the seed's: its leaves are the pooled model's less `pooling.*`,
    value for value (the pooling weights come from their own fold of the key), and the output is the
    independent numpy reference's (test_matches_independent_numpy_reference)."""
    off = EnergyModel(CFG, key=key)
    on = EnergyModel(dataclasses.replace(CFG, context_latents=3), key=key)
    leaves = lambda m: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(m)}
    off_leaves, on_leaves = leaves(off), leaves(on)
    assert off.pooling is None
    assert {name.split(".")[1] for name in set(on_leaves) - set(off_leaves)} == {"pooling"}
    assert set(off_leaves) <= set(on_leaves)
    for name, value in off_leaves.items():
        np.testing.assert_array_equal(value, on_leaves[name])
    context, actions, mask = _inputs(key)
    enc = off.encode_context(context, mask)
    assert enc.keys.shape == (6, CFG.hidden)
    np.testing.assert_array_equal(enc.mask, mask)


def test_context_latents_pool_the_context_to_l_tokens(key):
    """With L latents the pairwise attention reads L pooled tokens: P = Z + W_o MHA(W_q Z, W_k X, W_v X; mask)
    recomputed by hand; masked tokens still have no influence; a fully masked context stays finite."""
    model = EnergyModel(dataclasses.replace(CFG, context_latents=3), key=key)
    context, actions, mask = _inputs(key)
    enc = model.encode_context(context, mask)
    assert enc.keys.shape == (3, CFG.hidden) and enc.mask.shape == (3,) and bool(enc.mask.all())
    p = jax.tree.map(np.asarray, model.pooling)
    linear = lambda x, lin: x @ lin.weight.T + lin.bias  # noqa: E731
    x = np.asarray(jax.vmap(model.context_proj)(context))
    heads, dh = CFG.num_heads, CFG.hidden // CFG.num_heads
    q = linear(p.latents, p.query).reshape(3, heads, dh)
    k = linear(x, p.key_proj).reshape(6, heads, dh)
    v = linear(x, p.value).reshape(6, heads, dh)
    logits = np.einsum("lnd,snd->nls", q, k) / math.sqrt(dh)
    logits = np.where(np.asarray(mask), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    pooled = p.latents + linear(np.einsum("nls,snd->lnd", weights, v).reshape(3, -1), p.out)
    np.testing.assert_allclose(enc.keys, linear(pooled, jax.tree.map(np.asarray, model.key_proj)), rtol=1e-5, atol=1e-6)
    energy = model(context, actions, mask)
    np.testing.assert_allclose(model.score(enc, actions), energy, rtol=1e-6)
    junk = context.at[4:].set(1e3)  # tokens 4, 5 are masked
    np.testing.assert_allclose(model(junk, actions, mask), energy, rtol=1e-6)
    assert np.isfinite(model(context, actions, jnp.zeros(6, bool)))
    with pytest.raises(ValueError, match="context_latents"):
        EnergyConfig(context_dim=12, action_dim=3, context_latents=0)
