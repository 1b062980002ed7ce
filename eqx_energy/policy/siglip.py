"""SigLIP vision tower as Pi0 uses it (ViT, pool "none", linear head into the LLM width; openpi.md §2.2).

    x = patchify(image) W_embed + b + pos      (f32, then cast to dtype)
    x = x + MHA(LN_0(x));  x = x + MLP(LN_1(x))     (depth pre-LN blocks, stacked, scanned)
    tokens = LN(x) W_head + b_head                  (n_patches, out_dim)

MLP is Dense -> GELU (tanh) -> Dense; attention has biases, no mask, the softmax in the compute dtype
(flax's default). Single image (H, W, 3) in [-1, 1]; to batch, use `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
import difflib

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from eqx_energy.policy._layers import Dense, LayerNorm, lecun, scan_layers, stack, xavier


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int


SIGLIP_VARIANTS: dict[str, SiglipConfig] = {
    "so400m": SiglipConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14),
    # CPU demo / tests: 2 blocks of width 64; with 64 px images and patch 16 that is 16 tokens per image.
    "tiny": SiglipConfig(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=16),
}


def siglip_config(variant: str) -> SiglipConfig:
    if variant not in SIGLIP_VARIANTS:
        close = difflib.get_close_matches(variant, SIGLIP_VARIANTS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown SigLIP variant {variant!r}; expected one of {sorted(SIGLIP_VARIANTS)}{hint}")
    return SIGLIP_VARIANTS[variant]


class SiglipAttention(eqx.Module):
    """softmax((q / sqrt(e)) k^T) v with q, k, v = x W + b per head (DenseGeneral kernels (d, n, e))."""

    query_kernel: Float[Array, "d n e"]
    query_bias: Float[Array, "n e"]
    key_kernel: Float[Array, "d n e"]
    key_bias: Float[Array, "n e"]
    value_kernel: Float[Array, "d n e"]
    value_bias: Float[Array, "n e"]
    out_kernel: Float[Array, "n e d"]
    out_bias: Float[Array, " d"]

    def __init__(self, width: int, num_heads: int, *, key: PRNGKeyArray):
        qkey, kkey, vkey, okey = jax.random.split(key, 4)
        e = width // num_heads
        self.query_kernel = xavier(qkey, (width, num_heads, e), width, width)
        self.key_kernel = xavier(kkey, (width, num_heads, e), width, width)
        self.value_kernel = xavier(vkey, (width, num_heads, e), width, width)
        self.out_kernel = xavier(okey, (num_heads, e, width), width, width)
        self.query_bias = jnp.zeros((num_heads, e), jnp.float32)
        self.key_bias = jnp.zeros((num_heads, e), jnp.float32)
        self.value_bias = jnp.zeros((num_heads, e), jnp.float32)
        self.out_bias = jnp.zeros((width,), jnp.float32)

    def __call__(self, x: Float[Array, "t d"]) -> Float[Array, "t d"]:
        dt = x.dtype

        def proj(kernel, bias):
            return jnp.einsum("td,dne->tne", x, kernel.astype(dt)) + bias.astype(dt)[None]

        q, k, v = proj(self.query_kernel, self.query_bias), proj(self.key_kernel, self.key_bias), proj(self.value_kernel, self.value_bias)
        q = q / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32)).astype(dt)
        probs = jax.nn.softmax(jnp.einsum("tne,sne->nts", q, k), axis=-1)
        out = jnp.einsum("nts,sne->tne", probs, v)
        return jnp.einsum("tne,ned->td", out, self.out_kernel.astype(dt)) + self.out_bias.astype(dt)[None]


class SiglipBlock(eqx.Module):
    """Pre-LN encoder block: x + MHA(LN_0(x)), then + MLP(LN_1(x))."""

    ln_0: LayerNorm
    attn: SiglipAttention
    ln_1: LayerNorm
    mlp_0: Dense
    mlp_1: Dense

    def __init__(self, cfg: SiglipConfig, *, key: PRNGKeyArray):
        akey, m0key, m1key = jax.random.split(key, 3)
        self.ln_0 = LayerNorm(cfg.width)
        self.attn = SiglipAttention(cfg.width, cfg.num_heads, key=akey)
        self.ln_1 = LayerNorm(cfg.width)
        self.mlp_0 = Dense(cfg.width, cfg.mlp_dim, init="xavier", key=m0key)
        self.mlp_1 = Dense(cfg.mlp_dim, cfg.width, init="xavier", key=m1key)

    def __call__(self, x: Float[Array, "t d"]) -> Float[Array, "t d"]:
        dt = x.dtype
        x = x + self.attn(self.ln_0(x, dt))
        h = jax.nn.gelu(self.mlp_0(self.ln_1(x, dt), dt), approximate=True)
        return x + self.mlp_1(h, dt)


class Siglip(eqx.Module):
    """Image (H, W, 3) in [-1, 1] -> (H/P * W/P, out_dim) tokens; see the module docstring."""

    embedding: Float[Array, "p q 3 d"]  # conv kernel HWIO, stride = patch, VALID
    embedding_bias: Float[Array, " d"]
    pos_embedding: Float[Array, "1 n d"]
    blocks: SiglipBlock
    encoder_norm: LayerNorm
    head: Dense
    config: SiglipConfig = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    remat: bool = eqx.field(static=True)

    def __init__(self, cfg: SiglipConfig, image_size: int, out_dim: int, *, dtype: str = "bfloat16", remat: bool = False, key: PRNGKeyArray):
        if image_size % cfg.patch_size:
            raise ValueError(
                f"image_size={image_size} is not a multiple of the SigLIP patch size {cfg.patch_size}; "
                f"use e.g. {cfg.patch_size * max(1, image_size // cfg.patch_size)}"
            )
        ekey, pkey, bkey = jax.random.split(key, 3)
        p, d = cfg.patch_size, cfg.width
        n = (image_size // p) ** 2
        self.embedding = lecun(ekey, (p, p, 3, d), p * p * 3)
        self.embedding_bias = jnp.zeros((d,), jnp.float32)
        self.pos_embedding = jax.random.normal(pkey, (1, n, d), jnp.float32) / jnp.sqrt(float(d))
        self.blocks = stack(lambda k: SiglipBlock(cfg, key=k), cfg.depth, bkey)
        self.encoder_norm = LayerNorm(d)
        self.head = Dense(d, out_dim, init="zeros", key=ekey)
        self.config = cfg
        self.dtype = dtype
        self.remat = remat

    def __call__(self, image: Float[Array, "H W 3"]) -> Float[Array, "n o"]:
        p = self.config.patch_size
        h, w = image.shape[0] // p, image.shape[1] // p
        if h * w != self.pos_embedding.shape[1] or image.shape[0] % p or image.shape[1] % p:
            side = int(round(self.pos_embedding.shape[1] ** 0.5)) * p
            raise ValueError(f"image has shape {image.shape}; this SigLIP expects ({side}, {side}, 3): resize the images first")
        patches = image.astype(jnp.float32).reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, p, p, 3)
        x = jnp.einsum("tpqc,pqcd->td", patches, self.embedding.astype(jnp.float32)) + self.embedding_bias.astype(jnp.float32)[None]
        x = (x + self.pos_embedding[0].astype(jnp.float32)).astype(self.dtype)
        x, _ = scan_layers(lambda x, blk, _: (blk(x), None), x, self.blocks, remat=self.remat)
        return self.head(self.encoder_norm(x, self.dtype), self.dtype)
