"""Gemma / SigLIP ops against small independent numpy references."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_energy.policy._layers import LayerNorm
from eqx_energy.policy.gemma import AdaRMSNorm, ExpertLayer, Gemma, GemmaConfig, RMSNorm, apply_rope, attention_mask

RNG = np.random.default_rng(0)


def test_attention_mask_prefix_lm_pattern():
    # prefix of 3 (one padding), then a state token (ar) and a 2-token action block (ar at its start).
    valid = np.array([1, 1, 0, 1, 1, 1], bool)
    ar = np.array([0, 0, 0, 1, 1, 0], bool)
    got = np.asarray(attention_mask(jnp.asarray(valid), jnp.asarray(ar)))
    c = np.cumsum(ar)
    want = np.array([[valid[i] and valid[j] and c[j] <= c[i] for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(got, want)
    assert not got[:2, 3:].any()  # the prefix never sees the suffix
    assert got[3, :2].all() and not got[3, 4:].any()  # the state sees the prefix and itself only
    assert got[4:, [0, 1, 3, 4, 5]].all()  # actions see everything valid, bidirectionally
    assert not got[2].any() and not got[:, 2].any()  # padding neither attends nor is attended


def test_rope_matches_numpy_and_preserves_norm():
    x = RNG.normal(size=(5, 2, 8)).astype(np.float32)
    pos = np.array([0, 1, 2, 7, 30])
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos, jnp.int32)))
    inv = 10_000.0 ** (-(2.0 / 8) * np.arange(4))
    ang = pos[:, None, None] * inv[None, None, :]
    x1, x2 = x[..., :4], x[..., 4:]
    want = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[0], x[0])  # position 0 is the identity
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rmsnorm_and_adaptive_rmsnorm_match_numpy():
    x = RNG.normal(size=(4, 6)).astype(np.float32)
    scale = RNG.normal(size=(6,)).astype(np.float32)
    norm = RMSNorm(6)
    norm = jax.tree.map(lambda _: jnp.asarray(scale), norm)
    n = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6)
    y, gate = norm(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), n * (1 + scale), rtol=1e-5, atol=1e-6)
    assert gate is None

    ada = AdaRMSNorm(6, 5)
    kernel, bias = RNG.normal(size=(5, 18)).astype(np.float32), RNG.normal(size=(18,)).astype(np.float32)
    ada = AdaRMSNorm.__new__(AdaRMSNorm)
    object.__setattr__(ada, "kernel", jnp.asarray(kernel))
    object.__setattr__(ada, "bias", jnp.asarray(bias))
    cond = RNG.normal(size=(5,)).astype(np.float32)
    y, gate = ada(jnp.asarray(x), jnp.asarray(cond))
    s, sh, g = np.split(cond @ kernel + bias, 3)
    np.testing.assert_allclose(np.asarray(y), n * (1 + s) + sh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gate), g, rtol=1e-5, atol=1e-5)


def test_norms_with_bf16_params_sum_one_plus_scale_in_f32():
    """bf16 params: y = bf16(n * (1 + scale) [+ shift]) with the sums in f32, rounded once (openpi's XLA).

    Scales in [1e-3, 3.5e-3] vanish from a bf16 `1 + scale` (it rounds to 1), so that formula differs."""
    bf16, rng = jnp.bfloat16, np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 16)), bf16)
    scale = jnp.asarray(rng.uniform(1e-3, 3.5e-3, size=16), bf16)
    shift = jnp.asarray(rng.uniform(-1e-2, 1e-2, size=16), bf16)
    xf, sf, hf = (np.asarray(a, np.float32) for a in (x, scale, shift))
    n = xf / np.sqrt(np.mean(xf**2, -1, keepdims=True) + 1e-6)
    bf16_sum = np.asarray(1 + scale, np.float32)  # the old formula's factor: all ones
    assert (bf16_sum == 1).all()

    y, _ = jax.tree.map(lambda _: scale, RMSNorm(16))(x)
    want = (n * (1 + sf)).astype(bf16)
    np.testing.assert_array_equal(np.asarray(y), want)
    assert (want != (n * bf16_sum).astype(bf16)).mean() > 0.25

    # adaptive: a zero kernel makes the modulation the bias, [scale, shift, gate], exactly
    gate = jnp.asarray(rng.normal(size=16), bf16)
    ada = AdaRMSNorm.__new__(AdaRMSNorm)
    object.__setattr__(ada, "kernel", jnp.zeros((4, 48), bf16))
    object.__setattr__(ada, "bias", jnp.concatenate([scale, shift, gate]))
    y, g = ada(x, jnp.ones((4,), bf16))
    want = (n * (1 + sf) + hf).astype(bf16)
    np.testing.assert_array_equal(np.asarray(y), want)
    assert (want != (n * bf16_sum + hf).astype(bf16)).mean() > 0.25
    assert g.dtype == bf16 and np.array_equal(np.asarray(g), np.asarray(gate))


def test_layernorm_matches_numpy():
    x = RNG.normal(size=(3, 8)).astype(np.float32) * 3 + 1
    ln = LayerNorm(8)
    scale, bias = RNG.normal(size=8).astype(np.float32), RNG.normal(size=8).astype(np.float32)
    ln = LayerNorm.__new__(LayerNorm)
    object.__setattr__(ln, "scale", jnp.asarray(scale))
    object.__setattr__(ln, "bias", jnp.asarray(bias))
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * scale + bias
    np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x), jnp.float32)), want, rtol=1e-4, atol=1e-4)


def _numpy_gemma_layer(layers, xs, positions, mask):
    """One mixture layer in numpy: per-expert RMSNorm/projections, joint MQA, GeGLU (plain norms, zero scales)."""
    def rms(x):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6)

    def rope(x):
        e = x.shape[-1]
        ang = positions[:, None, None] * (10_000.0 ** (-(2.0 / e) * np.arange(e // 2)))[None, None]
        x1, x2 = x[..., : e // 2], x[..., e // 2 :]
        return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)

    hs = [rms(x) for x in xs]
    q = np.concatenate([np.einsum("td,nde->tne", h, np.asarray(l.q_einsum)) for h, l in zip(hs, layers)])
    k = np.concatenate([np.einsum("td,de->te", h, np.asarray(l.kv_einsum)[0, 0]) for h, l in zip(hs, layers)])
    v = np.concatenate([np.einsum("td,de->te", h, np.asarray(l.kv_einsum)[1, 0]) for h, l in zip(hs, layers)])
    q, k = rope(q) / np.sqrt(q.shape[-1]), rope(k[:, None])[:, 0]
    logits = np.einsum("tne,se->nts", q, k)
    logits = np.where(mask[None], logits, -1e30)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    enc = np.einsum("nts,se->tne", p, v)
    outs, start = [], 0
    for x, l in zip(xs, layers):
        y = x + np.einsum("tne,ned->td", enc[start : start + len(x)], np.asarray(l.attn_vec_einsum))
        start += len(x)
        h = rms(y)
        w = np.asarray(l.gating_einsum)
        a = h @ w[0]
        gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
        outs.append(y + (gelu * (h @ w[1])) @ np.asarray(l.linear))
    return outs


def test_gemma_mixture_layer_matches_numpy():
    cfgs = (GemmaConfig(16, 1, 24, 4, 1, 8), GemmaConfig(8, 1, 12, 4, 1, 8))
    gemma = jax.jit(lambda k: Gemma(cfgs, vocab_size=10, embed_dtype="float32", key=k))(jax.random.key(0))
    xs = [RNG.normal(size=(5, 16)).astype(np.float32), RNG.normal(size=(3, 8)).astype(np.float32)]
    valid = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
    ar = np.array([0, 0, 0, 0, 0, 1, 0, 0], bool)
    mask = np.asarray(attention_mask(jnp.asarray(valid), jnp.asarray(ar)))
    positions = np.cumsum(valid) - 1
    (o0, o1), (k, v) = eqx.filter_jit(lambda g, *a: g(*a))(gemma, tuple(jnp.asarray(x) for x in xs), jnp.asarray(positions, jnp.int32), jnp.asarray(mask))
    layers = [jax.tree.map(lambda a: a[0], l) for l in gemma.layers]
    w0, w1 = _numpy_gemma_layer(layers, xs, positions, mask)
    rms = lambda x: x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6)  # final norms (scale 0)
    rows = valid[:5]  # padding rows attend to nothing: not meaningful
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(o0)[rows], rms(w0)[rows], rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(np.asarray(o1), rms(w1), rtol=2e-4, atol=2e-4)
    assert k.shape == v.shape == (1, 8, 1, 8)


def test_gemma_rejects_mismatched_experts():
    with pytest.raises(ValueError, match="share depth"):
        Gemma((GemmaConfig(16, 1, 24, 4, 1, 8), GemmaConfig(8, 2, 12, 4, 1, 8)), vocab_size=4, key=jax.random.key(0))


def test_expert_layer_init_shapes():
    layer = eqx.filter_eval_shape(ExpertLayer, GemmaConfig(16, 1, 24, 4, 1, 8), adaptive=True, key=jax.random.key(1))
    assert layer.q_einsum.shape == (4, 16, 8) and layer.kv_einsum.shape == (2, 1, 16, 8)
    assert layer.pre_attention_norm.kernel.shape == (16, 48)
