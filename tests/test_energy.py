import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_energy import EnergyConfig, EnergyModel
from eqx_energy.energy import MLPResNet, sinusoidal_encoding

CFG = EnergyConfig(context_dim=12, action_dim=3, hidden=16, num_heads=4, dropout=0.2)
# Forward passes run jitted: run eagerly, every primitive compiles on its own (~0.1 s at -O0). `jit(model)`
# compiles once per model structure and shapes, shared by every test that calls it. Models are built
# eagerly: the initializer's primitives are the same for every config, whereas a jitted initializer
# compiles the whole random init again for each (~2.5 s).
jit = eqx.filter_jit


def _inputs(key, s=6, h=5, valid=4):
    kc, ka = jax.random.split(key)
    context = jax.random.normal(kc, (s, CFG.context_dim))
    actions = jax.random.normal(ka, (h, CFG.action_dim))
    return context, actions, jnp.arange(s) < valid


@pytest.fixture(scope="module")
def model():
    """EnergyModel(CFG) at key 0, the model of every test here that does not need another."""
    return EnergyModel(CFG, key=jax.random.key(0))


@pytest.fixture(scope="module")
def timed_model():
    """The time-conditioned CFG model at key 0."""
    return EnergyModel(dataclasses.replace(CFG, time_conditioning=True), key=jax.random.key(0))


@pytest.fixture(scope="module")
def pooled_model():
    """The CFG model with 3 context latents at key 0."""
    return EnergyModel(dataclasses.replace(CFG, context_latents=3), key=jax.random.key(0))


@pytest.fixture(scope="module")
def inputs():
    """_inputs at key 0: context (6, 12), actions (5, 3), tokens 4 and 5 masked."""
    return _inputs(jax.random.key(0))


@jit
def energy_and_action_grad(model, context, actions, mask):
    """E of one example and dE/da."""
    return jax.value_and_grad(lambda a: model(context, a, mask))(actions)


def _leaves(model):
    """{path: numpy value} of every leaf."""
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(model)}


def test_returns_f32_scalar_and_mean_of_per_step(model, inputs):
    context, actions, mask = inputs

    @jit
    def encode_and_score(model, context, actions, mask):
        return model.score(model.encode_context(context, mask), actions)

    energy, steps = jit(model)(context, actions, mask), jit(model.per_step)(context, actions, mask)
    assert energy.shape == () and energy.dtype == jnp.float32
    assert steps.shape == (5,)
    np.testing.assert_allclose(energy, np.asarray(steps).mean(), rtol=1e-6)
    np.testing.assert_allclose(encode_and_score(model, context, actions, mask), energy, rtol=1e-6)


def test_matches_independent_numpy_reference(model, inputs):
    """The whole forward pass recomputed with numpy from the parameters (DESIGN's math)."""
    context, actions, mask = inputs
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
    np.testing.assert_allclose(jit(model)(context, actions, mask), expected, rtol=1e-5)


def test_masked_tokens_have_no_influence(model, inputs):
    context, actions, mask = inputs
    junk = np.array(context)
    junk[~np.asarray(mask)] = 1e3
    assert jit(model)(junk, actions, mask) == jit(model)(context, actions, mask)
    grads = jit(jax.grad(lambda c, model, actions, mask: model(c, actions, mask)))(context, model, actions, mask)
    assert np.all(np.asarray(grads)[~np.asarray(mask)] == 0)


def test_fully_masked_context_is_finite(model, inputs):
    context, actions, _ = inputs
    none = np.zeros(context.shape[0], bool)
    energy, grad = energy_and_action_grad(model, context, actions, none)
    assert np.isfinite(energy) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", ["sigmoid", "softplus", "identity"])
def test_output_transforms(key, inputs, name):
    cfg = EnergyConfig(context_dim=12, action_dim=3, hidden=16, num_heads=4, output=name)
    model = EnergyModel(cfg, key=key)
    context, actions, mask = inputs
    energies = np.asarray(jit(model.per_step)(context, actions, mask))
    grad = np.asarray(energy_and_action_grad(model, context, actions, mask)[1])
    if name == "sigmoid":
        assert np.all((energies > 0.1) & (energies < 2.1))
    if name == "softplus":
        assert np.all(energies > 1e-3)
    # identity is affine in the head's raw output: dE/da is never killed by a ReLU
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_dropout_only_with_key_and_training(key, model, inputs):
    @jit
    def energies(model, inputs, key):
        return (model(*inputs), model(*inputs, key=key, inference=True), model(*inputs, key=None, inference=False),
                model(*inputs, key=key, inference=False))

    base, inference, keyless, training = energies(model, inputs, key)
    assert inference == base
    assert keyless == base
    assert training != base


def test_bf16_context_is_cast_once(model, inputs):
    context, actions, mask = inputs
    energy = jit(model)(np.asarray(context).astype(jnp.bfloat16), actions, mask)
    assert energy.dtype == jnp.float32


def test_shape_errors_name_the_problem(key, model, inputs):
    context, actions, mask = inputs
    # jitted: the checks raise while tracing, before any primitive runs or compiles
    with pytest.raises(ValueError, match="action_dim"):
        jit(model)(context, np.zeros((5, 7), np.float32), mask)
    with pytest.raises(ValueError, match="context_dim"):
        jit(model)(np.zeros((6, 5), np.float32), actions, mask)
    with pytest.raises(ValueError, match="max_horizon"):
        jit(lambda k: EnergyModel(EnergyConfig(12, 3, 16, 4, max_horizon=2), key=k)(context, actions, mask))(key)
    with pytest.raises(ValueError, match="divisible"):
        EnergyConfig(12, 3, hidden=10, num_heads=4)
    with pytest.raises((ValueError, TypeError), match="output"):  # TypeError: the jaxtyping hook
        EnergyConfig(12, 3, output="relu")


def test_mlp_resnet_and_position_encoding_shapes(key):
    net = MLPResNet(2, 5, 8, 1, key=key)
    out, pe = jit(lambda net: (net(jnp.ones(5)), sinusoidal_encoding(4, 6)))(net)
    assert out.shape == (1,) and len(net.blocks) == 2
    pe = np.asarray(pe)
    np.testing.assert_allclose(pe[0], [0, 1, 0, 1, 0, 1], atol=1e-7)
    np.testing.assert_allclose(pe[3, 0], np.sin(3.0), rtol=1e-6)


def test_time_conditioning_off_keeps_the_seed_parameter_tree(model, timed_model, inputs):
    """Without the option there are no time weights: the leaves (paths, shapes, values) are those of a
    time-conditioned model less `time_proj`, so seed-format checkpoints load as before."""
    off, on = model, timed_model
    off_leaves, on_leaves = _leaves(off), _leaves(on)
    assert off.time_proj is None
    assert set(on_leaves) - set(off_leaves) == {".time_proj.weight", ".time_proj.bias"}
    assert set(off_leaves) <= set(on_leaves)
    for name, value in off_leaves.items():
        np.testing.assert_array_equal(value, on_leaves[name])
    context, actions, mask = inputs
    with pytest.raises(ValueError, match="time_conditioning"):
        jit(off)(context, actions, mask, 0.5)


def test_time_conditioned_energy_depends_on_t(timed_model, inputs):
    @jit
    def energies(model, context, actions, mask):
        enc = model.encode_context(context, mask)
        return {
            "clean": model(context, actions, mask), "zero": model(context, actions, mask, 0.0),
            "late": model(context, actions, mask, 0.7), "late_score": model.score(enc, actions, jnp.float32(0.7)),
            "scores": jax.vmap(lambda t: model.score(enc, actions, t))(jnp.asarray([0.0, 0.7])),
        }

    out = jax.tree.map(np.asarray, energies(timed_model, *inputs))
    clean = out["clean"]
    assert out["zero"] == clean  # t=None means t=0 (clean)
    assert abs(float(out["late"]) - float(clean)) > 1e-4
    np.testing.assert_allclose(out["late_score"], out["late"], rtol=1e-6)
    np.testing.assert_allclose(out["scores"], [clean, out["late"]], rtol=1e-6)


def test_action_input_norm_off_sees_the_scale_and_offset_of_each_step(key, model, inputs):
    """The seed's input LayerNorm over the action dims makes E invariant to a_t -> s a_t + m per step;
    `action_input_norm=False` removes that blindness and keeps the parameter tree."""
    context, actions, mask = inputs
    seed_format = model
    raw = EnergyModel(dataclasses.replace(CFG, action_input_norm=False), key=key)
    moved = 3.0 * np.asarray(actions) + 0.7
    seed_energy, raw_energy = jit(seed_format), jit(raw)
    np.testing.assert_allclose(seed_energy(context, moved, mask), seed_energy(context, actions, mask), rtol=1e-5)
    assert abs(float(raw_energy(context, moved, mask)) - float(raw_energy(context, actions, mask))) > 1e-3
    assert jax.tree.structure(jax.tree.leaves(seed_format)) == jax.tree.structure(jax.tree.leaves(raw))
    for x, y in zip(jax.tree.leaves(seed_format), jax.tree.leaves(raw)):
        np.testing.assert_array_equal(x, y)


def test_context_latents_off_keeps_the_seed_parameter_tree_and_outputs(model, pooled_model, inputs):
    """Without pooling the model is the seed's: its leaves are the pooled model's less `pooling.*`,
    value for value (the pooling weights come from their own fold of the key), and the output is the
    independent numpy reference's (test_matches_independent_numpy_reference)."""
    off, on = model, pooled_model
    off_leaves, on_leaves = _leaves(off), _leaves(on)
    assert off.pooling is None
    assert {name.split(".")[1] for name in set(on_leaves) - set(off_leaves)} == {"pooling"}
    assert set(off_leaves) <= set(on_leaves)
    for name, value in off_leaves.items():
        np.testing.assert_array_equal(value, on_leaves[name])
    context, actions, mask = inputs
    enc = jit(off.encode_context)(context, mask)
    assert enc.keys.shape == (6, CFG.hidden)
    np.testing.assert_array_equal(enc.mask, mask)


def test_context_latents_pool_the_context_to_l_tokens(pooled_model, inputs):
    """With L latents the pairwise attention reads L pooled tokens: P = Z + W_o MHA(W_q Z, W_k X, W_v X; mask)
    recomputed by hand; masked tokens still have no influence; a fully masked context stays finite."""
    model = pooled_model
    context, actions, mask = inputs
    junk = np.array(context)
    junk[4:] = 1e3  # tokens 4, 5 are masked

    @jit
    def encoding_tokens_and_score(model, context, actions, mask):
        enc = model.encode_context(context, mask)
        return enc, jax.vmap(model.context_proj)(context), model.score(enc, actions)

    enc, x, scored = jax.tree.map(np.asarray, encoding_tokens_and_score(model, context, actions, mask))
    assert enc.keys.shape == (3, CFG.hidden) and enc.mask.shape == (3,) and bool(enc.mask.all())
    p = jax.tree.map(np.asarray, model.pooling)
    linear = lambda x, lin: x @ lin.weight.T + lin.bias  # noqa: E731
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
    energy = jit(model)(context, actions, mask)
    np.testing.assert_allclose(scored, energy, rtol=1e-6)
    np.testing.assert_allclose(jit(model)(junk, actions, mask), energy, rtol=1e-6)
    assert np.isfinite(jit(model)(context, actions, np.zeros(6, bool)))
    with pytest.raises(ValueError, match="context_latents"):
        EnergyConfig(context_dim=12, action_dim=3, context_latents=0)
