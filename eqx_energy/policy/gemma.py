"""Gemma as openpi runs it: a mixture of transformers with one joint attention (reference/openpi.md §2.3).

Expert 0 is the PaliGemma VLM, expert 1 the action expert. Each expert projects its own tokens with its
own weights; the queries, keys and values of the experts that are present are concatenated along the
sequence in expert order, one multi-query attention runs over them, and each slice goes back through
its expert's output projection. Per layer and expert:

    h, g = norm(x, cond);  x = x + attn(h) * g;  h, g = norm'(x, cond);  x = x + GeGLU(h) * g

with g = 1 for a plain RMSNorm. Layers are stored stacked (leading depth axis) and run with
`jax.lax.scan`. Single example: tokens are (t d); to batch, use `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
import difflib

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from eqx_energy.policy._layers import lecun, scan_layers, stack

PALIGEMMA_VOCAB_SIZE = 257_152
_BIG_NEG = -2.3819763e38  # openpi / gemma's mask value (not -inf: a fully masked row stays finite)


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    width: int  # d, the residual width
    depth: int  # number of layers
    mlp_dim: int  # GeGLU hidden width
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (1 = multi-query)
    head_dim: int


GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "dummy": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    # CPU demo / tests: much smaller than openpi's dummy, same head layout rules (shared by both experts).
    # An action expert must be wider than the padded action dim (each action token carries all of x_t):
    # tiny_expert (32) suits unit tests only; policies that have to imitate use tiny (64) as the expert.
    "tiny": GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
    "tiny_expert": GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
}


def gemma_config(variant: str) -> GemmaConfig:
    if variant not in GEMMA_VARIANTS:
        close = difflib.get_close_matches(variant, GEMMA_VARIANTS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown Gemma variant {variant!r}; expected one of {sorted(GEMMA_VARIANTS)}{hint}")
    return GEMMA_VARIANTS[variant]


KVCache = tuple[Float[Array, "l s k e"], Float[Array, "l s k e"]]


def rms_normalize(x: Float[Array, "*t d"]) -> Float[Array, "*t d"]:
    """n = x / sqrt(mean(x^2) + 1e-6), the mean of squares in f32; the result is f32."""
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return x * jnp.reciprocal(jnp.sqrt(var + 1e-6))


class RMSNorm(eqx.Module):
    """y = n * (1 + scale), computed in f32 and cast back to x's dtype (scale starts at 0).

    `1 + scale` is an f32 sum whatever the params' dtype: openpi writes it in the params' dtype, but
    XLA keeps the fused sum in f32, so with bf16 params a bf16 sum would round where openpi does not.
    """

    scale: Float[Array, " d"]

    def __init__(self, width: int):
        self.scale = jnp.zeros((width,), jnp.float32)

    def __call__(self, x: Float[Array, "t d"], cond: None = None) -> tuple[Float[Array, "t d"], None]:
        return (rms_normalize(x) * (1 + self.scale.astype(jnp.float32))[None]).astype(x.dtype), None


class AdaRMSNorm(eqx.Module):
    """Adaptive RMSNorm (Pi0.5 action expert): [scale, shift, gate] = Dense(cond) in x's dtype;
    y = n * (1 + scale) + shift with scale and shift widened to f32 first (as RMSNorm's `1 + scale`),
    cast back to x's dtype; the gate (x's dtype) multiplies the residual branch.
    """

    kernel: Float[Array, "d d3"]
    bias: Float[Array, " d3"]

    def __init__(self, width: int, cond_width: int):
        self.kernel = jnp.zeros((cond_width, 3 * width), jnp.float32)
        self.bias = jnp.zeros((3 * width,), jnp.float32)

    def __call__(self, x: Float[Array, "t d"], cond: Float[Array, " c"]) -> tuple[Float[Array, "t d"], Float[Array, " d"]]:
        dtype = x.dtype
        mod = jnp.dot(cond.astype(dtype), self.kernel.astype(dtype)) + self.bias.astype(dtype)
        scale, shift, gate = jnp.split(mod.astype(jnp.float32), 3, axis=-1)
        return (rms_normalize(x) * (1 + scale)[None] + shift[None]).astype(dtype), gate.astype(dtype)


def _norm(width: int, adaptive: bool) -> RMSNorm | AdaRMSNorm:
    return AdaRMSNorm(width, width) if adaptive else RMSNorm(width)


class ExpertLayer(eqx.Module):
    """One expert's weights in one layer (openpi names: q_einsum, kv_einsum, attn_vec_einsum, mlp)."""

    q_einsum: Float[Array, "n d e"]
    kv_einsum: Float[Array, "2 k d e"]
    attn_vec_einsum: Float[Array, "n e d"]
    gating_einsum: Float[Array, "2 d f"]
    linear: Float[Array, "f d"]
    pre_attention_norm: RMSNorm | AdaRMSNorm
    pre_ffw_norm: RMSNorm | AdaRMSNorm

    def __init__(self, cfg: GemmaConfig, adaptive: bool, *, key: PRNGKeyArray):
        qkey, kvkey, okey, gkey, lkey = jax.random.split(key, 5)
        d, n, k, e, f = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
        self.q_einsum = lecun(qkey, (n, d, e), d)
        self.kv_einsum = lecun(kvkey, (2, k, d, e), d)
        self.attn_vec_einsum = lecun(okey, (n, e, d), n * e)
        self.gating_einsum = lecun(gkey, (2, d, f), d)
        self.linear = lecun(lkey, (f, d), f)
        self.pre_attention_norm = _norm(d, adaptive)
        self.pre_ffw_norm = _norm(d, adaptive)

    def ffw(self, x: Float[Array, "t d"]) -> Float[Array, "t d"]:
        """GeGLU: (gelu_tanh(x W0) * (x W1)) W_linear, all in x's dtype."""
        w = self.gating_einsum.astype(x.dtype)
        hidden = jax.nn.gelu(jnp.dot(x, w[0]), approximate=True) * jnp.dot(x, w[1])
        return jnp.dot(hidden, self.linear.astype(x.dtype))


def apply_rope(x: Float[Array, "t n e"], positions: Int[Array, " t"], max_wavelength: float = 10_000.0) -> Float[Array, "t n e"]:
    """Split-halves RoPE: theta_j = pos / max_wavelength^(2j/e); [x1 cos - x2 sin, x2 cos + x1 sin] in f32, cast back."""
    e = x.shape[-1]
    timescale = max_wavelength ** ((2.0 / e) * jnp.arange(e // 2, dtype=jnp.float32))
    radians = (positions[:, None] / timescale[None, :])[:, None, :]
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(input_mask: Bool[Array, " t"], ar_mask: Bool[Array, " t"]) -> Bool[Array, "t t"]:
    """Prefix-LM mask (big_vision): c = cumsum(ar); i attends j iff c_j <= c_i and both tokens are valid."""
    c = jnp.cumsum(ar_mask.astype(jnp.int32))
    return (c[None, :] <= c[:, None]) & input_mask[None, :] & input_mask[:, None]


def _joint_attention(layers, hs, positions, mask, cache, cfg: GemmaConfig):
    """Multi-query attention over the concatenation of the present experts' tokens; returns per-expert outputs."""
    qs, ks, vs = [], [], []
    for layer, h in zip(layers, hs):
        if h is not None:
            qs.append(jnp.einsum("td,nde->tne", h, layer.q_einsum.astype(h.dtype)))
            k, v = jnp.einsum("sd,ckde->cske", h, layer.kv_einsum.astype(h.dtype))
            ks.append(k)
            vs.append(v)
    q = apply_rope(jnp.concatenate(qs), positions) * cfg.head_dim**-0.5
    k = apply_rope(jnp.concatenate(ks), positions)
    v = jnp.concatenate(vs)
    if cache is not None:
        k, v = jnp.concatenate([cache[0], k]), jnp.concatenate([cache[1], v])
    t = q.shape[0]
    q = q.reshape(t, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
    logits = jnp.einsum("tkge,ske->kgts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask[None, None], logits, _BIG_NEG), axis=-1).astype(v.dtype)
    enc = jnp.einsum("kgts,ske->tkge", probs, v).reshape(t, cfg.num_heads, cfg.head_dim)
    outs, start = [], 0
    for layer, h in zip(layers, hs):
        if h is None:
            outs.append(None)
        else:
            outs.append(jnp.einsum("tne,ned->td", enc[start : start + h.shape[0]], layer.attn_vec_einsum.astype(h.dtype)))
            start += h.shape[0]
    return outs, (k, v)


def _gated(x, y, gate):
    return x + y if gate is None else x + y * gate[None]


class Gemma(eqx.Module):
    """The mixture-of-experts Gemma stack: embedder (expert 0 only), stacked layers, final norms.

    `__call__(xs, positions, mask, adarms_cond, kv_cache)` runs the experts whose entry in `xs` is not
    None. mask (t, s) is True where query t may attend key s (s = cached + t). Returns the final-normed
    outputs (None where absent) and the post-RoPE keys/values (l s k e), cache included.
    """

    embedder: Float[Array, "v d"]
    layers: tuple[ExpertLayer, ...]
    final_norms: tuple[RMSNorm | AdaRMSNorm, ...]
    configs: tuple[GemmaConfig, ...] = eqx.field(static=True)
    adaptive: tuple[bool, ...] = eqx.field(static=True)
    embed_dtype: str = eqx.field(static=True)
    remat: bool = eqx.field(static=True)

    def __init__(
        self,
        configs: tuple[GemmaConfig, ...],
        *,
        vocab_size: int = PALIGEMMA_VOCAB_SIZE,
        adaptive: tuple[bool, ...] | None = None,
        embed_dtype: str = "bfloat16",
        remat: bool = False,
        key: PRNGKeyArray,
    ):
        first = configs[0]
        for c in configs[1:]:
            if (c.depth, c.num_heads, c.num_kv_heads, c.head_dim) != (first.depth, first.num_heads, first.num_kv_heads, first.head_dim):
                raise ValueError(
                    f"experts must share depth, num_heads, num_kv_heads and head_dim; got {first} and {c}: "
                    "pick variants with the same head layout"
                )
        adaptive = tuple(False for _ in configs) if adaptive is None else adaptive
        ekey, *lkeys = jax.random.split(key, 1 + len(configs))
        self.embedder = jax.random.normal(ekey, (vocab_size, first.width), jnp.float32)
        self.layers = tuple(
            stack(lambda k, c=c, a=a: ExpertLayer(c, a, key=k), first.depth, lk)
            for c, a, lk in zip(configs, adaptive, lkeys)
        )
        self.final_norms = tuple(_norm(c.width, a) for c, a in zip(configs, adaptive))
        self.configs = tuple(configs)
        self.adaptive = adaptive
        self.embed_dtype = embed_dtype
        self.remat = remat

    def embed(self, tokens: Int[Array, " t"]) -> Float[Array, "t d"]:
        """x = table[tokens] * sqrt(d), the factor cast to the table's dtype (45.25 in bf16), then to embed_dtype."""
        x = self.embedder[tokens]
        x = x * jnp.sqrt(jnp.asarray(self.configs[0].width, jnp.float32)).astype(x.dtype)
        return x.astype(self.embed_dtype)

    def __call__(
        self,
        xs: tuple[Float[Array, "_ _"] | None, ...],
        positions: Int[Array, " t"],
        mask: Bool[Array, "t s"],
        adarms_cond: tuple[Float[Array, " _"] | None, ...] | None = None,
        kv_cache: tuple[Float[Array, "l _ k e"], Float[Array, "l _ k e"]] | None = None,
    ) -> tuple[tuple[Float[Array, "_ _"] | None, ...], KVCache]:
        if len(xs) != len(self.configs):
            raise ValueError(f"xs must have one entry per expert ({len(self.configs)}), got {len(xs)}")
        conds = adarms_cond if adarms_cond is not None else tuple(None for _ in self.configs)
        for i, (a, c) in enumerate(zip(self.adaptive, conds)):
            if xs[i] is not None and a != (c is not None):
                raise ValueError(f"expert {i} {'needs' if a else 'takes no'} adarms_cond (adaptive RMSNorm={a})")
        xs = tuple(None if x is None else x.astype(self.embed_dtype) for x in xs)
        cfg = self.configs[0]

        def body(xs, layers, cache):
            normed = [None if x is None else l.pre_attention_norm(x, c) for l, x, c in zip(layers, xs, conds)]
            attn, kv = _joint_attention(layers, [None if n is None else n[0] for n in normed], positions, mask, cache, cfg)
            xs = [None if x is None else _gated(x, y, n[1]) for x, y, n in zip(xs, attn, normed)]
            out = []
            for l, x, c in zip(layers, xs, conds):
                if x is None:
                    out.append(None)
                else:
                    h, gate = l.pre_ffw_norm(x, c)
                    out.append(_gated(x, l.ffw(h), gate))
            return tuple(out), kv

        xs, kv = scan_layers(body, xs, self.layers, kv_cache, remat=self.remat)
        outs = tuple(None if x is None else n(x, c)[0] for n, x, c in zip(self.final_norms, xs, conds))
        return outs, kv
