"""Small building blocks shared by SigLIP, Gemma and Pi0, laid out like openpi's parameters.

`Dense` keeps flax's (in, out) kernel so openpi checkpoints load without a transpose. Initialisers
have openpi's variances (§1.5 of reference/openpi.md), drawn untruncated, so from-scratch training
(the demo) starts alike.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray



def lecun(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Float[Array, "..."]:
    """N(0, 1/fan_in): lecun-normal's variance, drawn untruncated (one cheap op; only from-scratch init uses it)."""
    return jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(float(fan_in))


def xavier(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int, fan_out: int) -> Float[Array, "..."]:
    """U(-l, l), l = sqrt(6 / (fan_in + fan_out)) (xavier-uniform)."""
    lim = (6.0 / (fan_in + fan_out)) ** 0.5
    return jax.random.uniform(key, shape, jnp.float32, -lim, lim)


class Dense(eqx.Module):
    """y = x @ kernel + bias, kernel (in, out).

    With `dtype=None` JAX promotes inputs and weights to a common dtype (nnx.Linear: f32 inputs with
    bf16 weights compute in f32); with a dtype everything is cast to it first (flax `Dense(dtype=...)`).
    """

    kernel: Float[Array, "i o"]
    bias: Float[Array, " o"]

    def __init__(self, in_features: int, out_features: int, *, init: str = "lecun", key: PRNGKeyArray):
        if init == "lecun":
            self.kernel = lecun(key, (in_features, out_features), in_features)
        elif init == "xavier":
            self.kernel = xavier(key, (in_features, out_features), in_features, out_features)
        elif init == "zeros":
            self.kernel = jnp.zeros((in_features, out_features), jnp.float32)
        else:
            raise ValueError(f"init must be 'lecun', 'xavier' or 'zeros', got {init!r}")
        self.bias = jnp.zeros((out_features,), jnp.float32)

    def __call__(self, x: Float[Array, "*t i"], dtype: DTypeLike | None = None) -> Float[Array, "*t o"]:
        kernel, bias = self.kernel, self.bias
        if dtype is not None:
            x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        return jnp.dot(x, kernel) + bias


class LayerNorm(eqx.Module):
    """Flax LayerNorm (eps 1e-6): y = (x - mean) * rsqrt(var + eps) * scale + bias.

    Mean and variance are f32 and use the fast form var = E[x^2] - E[x]^2; the result is cast to `dtype`.
    """

    scale: Float[Array, " d"]
    bias: Float[Array, " d"]

    def __init__(self, width: int):
        self.scale = jnp.ones((width,), jnp.float32)
        self.bias = jnp.zeros((width,), jnp.float32)

    def __call__(self, x: Float[Array, "*t d"], dtype: DTypeLike) -> Float[Array, "*t d"]:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean))
        mul = jax.lax.rsqrt(var + 1e-6) * self.scale
        return ((xf - mean) * mul + self.bias).astype(dtype)


def stack(make, depth: int, key: PRNGKeyArray):
    """Build `depth` copies of a module with independent keys; every array leaf gets a leading depth axis."""
    return eqx.filter_vmap(make)(jax.random.split(key, depth))


def scan_layers(body, carry, stacked, xs=None, *, remat: bool = False):
    """jax.lax.scan of `body(carry, layer, x) -> (carry, y)` over a stacked module's leading axis."""
    params, static = eqx.partition(stacked, eqx.is_array)

    def step(c, px):
        p, x = px
        return body(c, eqx.combine(p, static), x)

    if remat:
        step = jax.checkpoint(step, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(step, carry, (params, xs))
