"""The energy head E(context, actions): a cross-attention scorer over VLM prefix features.

Architecture (seeds 000 and 002, DESIGN.md "Reference architecture"):

    K, V   = W_k φ_c(c) + b_k,  W_v φ_c(c) + b_v          φ_c: MLPResNet over context tokens
    Q      = W_q dropout(φ_a(a) + PE) + b_q                 φ_a: MLPResNet over action steps
    Z      = W_o MHA(Q, K, V; key mask) + b_o               action steps query the context, no residual
    e_t    = T(ψ(Z_t))                                      ψ: MLPResNet head, T: output transform
    E      = mean_t e_t

With `context_latents` = L, the context is pooled to L learned latent tokens before the pairwise
attention (Perceiver, Jaegle et al. 2021, arXiv 2103.03206), once per context:

    X      = φ_c(c)                                         (s d), key mask m
    P      = Z + W_o' MHA(W_q' Z, W_k' X, W_v' X; m)        Z: (L d) learned, P: (L d)
    K, V   = W_k P + b_k,  W_v P + b_v                      every action step then attends over L, not s

so each (context, chunk) pair costs O(h L d) attention instead of O(h s d). Off (None) by default:
no pooling weights, the seed's parameter tree and outputs.

With `time_conditioning`, E(c, a, t) scores a chunk at flow time t (openpi: x_t = t eps + (1 - t) a,
t = 0 clean): W_t sincos(t) + b_t is added to φ_a(a) + PE (CEP's time-dependent energy, arXiv
2304.12824), and t=None means t=0. Without it the module has no time weights, so seed-format
checkpoints load unchanged, and passing t is an error.

The action-independent part (K, V) is `encode_context`; `score` runs for each candidate chunk.
Masks are True = valid. The energy lives in the policy's normalized action space; its parameters
and math are f32 (a bf16 backbone's features are cast once, on entry).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from eqx_energy._typing import Actions, Context, ContextMask, Scalar
from eqx_energy.policy.pi0 import posemb_sincos

FlowTime = Float[Array, ""] | float | None  # openpi's flow time: 1 = noise, 0 = clean; None = clean

OutputTransformName = Literal["sigmoid", "softplus", "identity"]

# (slope, scale, offset) per transform: sigmoid from seed 002 (range 0.1..2.1), softplus from
# seed 004; identity has no ReLU (a ReLU kills dE/da wherever the raw value is negative).
_OUTPUT_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "sigmoid": (0.5, 2.0, 0.1),
    "softplus": (1.0, 5.0, 1e-3),
    "identity": (1.0, 1.0, 0.0),
}


@dataclasses.dataclass(frozen=True)
class EnergyConfig:
    """Hyperparameters of `EnergyModel`. `None` output parameters take the transform's defaults."""

    context_dim: int
    action_dim: int
    hidden: int = 512
    num_heads: int = 8
    dropout: float = 0.2
    context_blocks: int = 1
    action_blocks: int = 1
    head_blocks: int = 2
    output: OutputTransformName = "sigmoid"
    output_slope: float | None = None
    output_scale: float | None = None
    output_offset: float | None = None
    max_horizon: int = 256
    time_conditioning: bool = False  # E(c, a, t): a time embedding added to the action tokens
    # The seed's φ_a starts with a LayerNorm over the a action dims of each step, which makes E blind to
    # each step's scale and offset (E(c, s a_t + m) = E(c, a_t)): with a = 2 or 4 it sees little more
    # than a direction. False feeds the raw normalized actions to φ_a (same weights, LayerNorm unused).
    action_input_norm: bool = True
    # Perceiver-style pooling of the context to this many learned latent tokens before the pairwise
    # attention (L << s: b² pairs attend over L tokens, not s); None = the seed's attention over every token
    context_latents: int | None = None

    def __post_init__(self):
        if self.output not in _OUTPUT_DEFAULTS:
            raise ValueError(
                f"energy.output={self.output!r} is not a known transform; "
                f"choose one of {sorted(_OUTPUT_DEFAULTS)}"
            )
        if self.hidden % self.num_heads:
            raise ValueError(
                f"energy.hidden={self.hidden} must be divisible by energy.num_heads={self.num_heads}"
            )
        for name in ("context_dim", "action_dim", "hidden", "num_heads", "max_horizon"):
            if getattr(self, name) <= 0:
                raise ValueError(f"energy.{name} must be positive, got {getattr(self, name)}")
        if self.context_latents is not None and self.context_latents <= 0:
            raise ValueError(f"energy.context_latents must be positive or null, got {self.context_latents}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"energy.dropout must be in [0, 1), got {self.dropout}")

    @property
    def output_params(self) -> tuple[float, float, float]:
        """Resolved (slope, scale, offset) of the output transform."""
        slope, scale, offset = _OUTPUT_DEFAULTS[self.output]
        return (
            slope if self.output_slope is None else self.output_slope,
            scale if self.output_scale is None else self.output_scale,
            offset if self.output_offset is None else self.output_offset,
        )


class ResidualBlock(eqx.Module):
    """x + ReLU(Linear(LayerNorm(x)))."""

    norm: eqx.nn.LayerNorm
    linear: eqx.nn.Linear

    def __init__(self, width: int, *, key: PRNGKeyArray):
        self.norm = eqx.nn.LayerNorm(width)
        self.linear = eqx.nn.Linear(width, width, key=key)

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " d"]:
        return x + jax.nn.relu(self.linear(self.norm(x)))


class MLPResNet(eqx.Module):
    """LayerNorm(i) -> Linear(i, d) -> ReLU -> n residual blocks -> LayerNorm(d) -> Linear(d, o).

    `norm_input=False` skips the first LayerNorm (its weights stay, unused, so the tree is unchanged)."""

    in_norm: eqx.nn.LayerNorm
    inp: eqx.nn.Linear
    blocks: tuple[ResidualBlock, ...]
    out_norm: eqx.nn.LayerNorm
    out: eqx.nn.Linear
    norm_input: bool = eqx.field(static=True)

    def __init__(self, num_blocks: int, in_dim: int, hidden: int, out_dim: int, *, key: PRNGKeyArray,
                 norm_input: bool = True):
        inp_key, out_key, *block_keys = jax.random.split(key, num_blocks + 2)
        self.in_norm = eqx.nn.LayerNorm(in_dim)
        self.inp = eqx.nn.Linear(in_dim, hidden, key=inp_key)
        self.blocks = tuple(ResidualBlock(hidden, key=k) for k in block_keys)
        self.out_norm = eqx.nn.LayerNorm(hidden)
        self.out = eqx.nn.Linear(hidden, out_dim, key=out_key)
        self.norm_input = norm_input

    def __call__(self, x: Float[Array, " i"]) -> Float[Array, " o"]:
        x = jax.nn.relu(self.inp(self.in_norm(x) if self.norm_input else x))
        for block in self.blocks:
            x = block(x)
        return self.out(self.out_norm(x))


def sinusoidal_encoding(length: int, width: int) -> Float[Array, "h d"]:
    """PE[t, 2i] = sin(t / 10000^(2i/d)), PE[t, 2i+1] = cos(t / 10000^(2i/d)) (Vaswani et al.)."""
    position = jnp.arange(length, dtype=jnp.float32)[:, None]
    inv_freq = jnp.exp(jnp.arange(0, width, 2, dtype=jnp.float32) * (-math.log(10000.0) / width))
    angles = position * inv_freq
    encoding = jnp.zeros((length, width), jnp.float32)
    encoding = encoding.at[:, 0::2].set(jnp.sin(angles))
    return encoding.at[:, 1::2].set(jnp.cos(angles[:, : width // 2]))


def _multihead_attention(
    queries: Float[Array, "q d"], keys: Float[Array, "s d"], values: Float[Array, "s d"], mask: Bool[Array, " s"],
    num_heads: int,
) -> Float[Array, "q d"]:
    """softmax(Q_n K_n^T / sqrt(d / n) masked) V_n per head n, heads concatenated; masked keys get weight 0."""
    length, width = queries.shape
    head_dim = width // num_heads
    q = queries.reshape(length, num_heads, head_dim)
    k = keys.reshape(-1, num_heads, head_dim)
    v = values.reshape(-1, num_heads, head_dim)
    logits = jnp.einsum("hnd,snd->nhs", q, k) / math.sqrt(head_dim)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    # Zeroing after the softmax keeps a fully masked context finite (uniform -> 0 weights).
    weights = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    return jnp.einsum("nhs,snd->hnd", weights, v).reshape(length, width)


class ContextPooling(eqx.Module):
    """P = Z + W_o MHA(W_q Z, W_k X, W_v X; mask): L learned latents Z read the s context tokens X."""

    latents: Float[Array, "l d"]
    query: eqx.nn.Linear
    key_proj: eqx.nn.Linear
    value: eqx.nn.Linear
    out: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, num_latents: int, width: int, num_heads: int, *, key: PRNGKeyArray):
        z_key, q_key, k_key, v_key, o_key = jax.random.split(key, 5)
        self.latents = jax.random.normal(z_key, (num_latents, width), jnp.float32)  # unit scale, as φ_c's tokens
        self.query = eqx.nn.Linear(width, width, key=q_key)
        self.key_proj = eqx.nn.Linear(width, width, key=k_key)
        self.value = eqx.nn.Linear(width, width, key=v_key)
        self.out = eqx.nn.Linear(width, width, key=o_key)
        self.num_heads = num_heads

    def __call__(self, tokens: Float[Array, "s d"], mask: Bool[Array, " s"]) -> Float[Array, "l d"]:
        latents = self.latents.astype(tokens.dtype)
        attended = _multihead_attention(
            jax.vmap(self.query)(latents), jax.vmap(self.key_proj)(tokens), jax.vmap(self.value)(tokens),
            mask, self.num_heads,
        )
        return latents + jax.vmap(self.out)(attended)


class ContextEncoding(eqx.Module):
    """Everything E needs from the context that does not depend on the actions."""

    keys: Float[Array, "s d"]
    values: Float[Array, "s d"]
    mask: Bool[Array, " s"]


class EnergyModel(eqx.Module):
    """E(context, actions) -> f32 scalar. Single example; callers `jax.vmap`."""

    context_proj: MLPResNet
    action_proj: MLPResNet
    action_dropout: eqx.nn.Dropout
    query: eqx.nn.Linear
    key_proj: eqx.nn.Linear
    value: eqx.nn.Linear
    attn_out: eqx.nn.Linear
    head: MLPResNet
    time_proj: eqx.nn.Linear | None  # sincos(t) -> hidden; None unless config.time_conditioning
    pooling: ContextPooling | None  # s context tokens -> L latents; None unless config.context_latents
    log_tau: Float[Array, ""] | None  # a learnable InfoNCE temperature (loss.learn_tau); None = fixed loss.tau
    config: EnergyConfig = eqx.field(static=True)

    def __init__(self, config: EnergyConfig, *, key: PRNGKeyArray, learn_tau: float | None = None):
        """`learn_tau`: initial value of a trainable temperature leaf `log_tau` (the losses then use
        tau = exp(log_tau)); None adds no leaf, so the parameter tree is the seed format's."""
        ctx_key, act_key, q_key, k_key, v_key, o_key, head_key = jax.random.split(key, 7)
        d = config.hidden
        self.context_proj = MLPResNet(config.context_blocks, config.context_dim, d, d, key=ctx_key)
        self.action_proj = MLPResNet(config.action_blocks, config.action_dim, d, d, key=act_key,
                                     norm_input=config.action_input_norm)
        self.action_dropout = eqx.nn.Dropout(config.dropout)
        self.query = eqx.nn.Linear(d, d, key=q_key)
        self.key_proj = eqx.nn.Linear(d, d, key=k_key)
        self.value = eqx.nn.Linear(d, d, key=v_key)
        self.attn_out = eqx.nn.Linear(d, d, key=o_key)
        self.head = MLPResNet(config.head_blocks, d, d, 1, key=head_key)
        # its own fold of the key: the other weights stay what they are without the option
        self.time_proj = eqx.nn.Linear(d, d, key=jax.random.fold_in(key, 7)) if config.time_conditioning else None
        self.pooling = (
            None if config.context_latents is None
            else ContextPooling(config.context_latents, d, config.num_heads, key=jax.random.fold_in(key, 8))
        )
        self.log_tau = None if learn_tau is None else jnp.log(jnp.asarray(learn_tau, jnp.float32))
        self.config = config

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    @property
    def dtype(self):
        """The head's compute dtype: its parameters' (f32; f64 only in gradient-check tests)."""
        return self.query.weight.dtype

    def encode_context(self, context: Context, context_mask: ContextMask) -> ContextEncoding:
        """Projected attention keys and values of the context tokens, or of the L pooled latents with
        `context_latents` (then all valid); computed once per context."""
        if context.shape[-1] != self.config.context_dim:
            raise ValueError(
                f"context has c={context.shape[-1]} features but energy.context_dim="
                f"{self.config.context_dim}; pass the policy's prefix features (b s c)"
            )
        tokens = jax.vmap(self.context_proj)(context.astype(self.dtype))
        if self.pooling is not None:
            tokens = self.pooling(tokens, context_mask)
            context_mask = jnp.ones(tokens.shape[0], bool)
        return ContextEncoding(
            keys=jax.vmap(self.key_proj)(tokens),
            values=jax.vmap(self.value)(tokens),
            mask=context_mask,
        )

    def encode_actions(
        self, actions: Actions, t: FlowTime = None, *, key: PRNGKeyArray | None = None, inference: bool = True
    ) -> Float[Array, "h d"]:
        """Attention queries of the action steps: W_q dropout(φ_a(a) + PE [+ W_t sincos(t) + b_t]) + b_q."""
        horizon, action_dim = actions.shape
        if action_dim != self.config.action_dim:
            raise ValueError(
                f"actions have a={action_dim} dims but energy.action_dim={self.config.action_dim}; "
                "slice padded model actions to [..., :action_dim] first"
            )
        if horizon > self.config.max_horizon:
            raise ValueError(
                f"action horizon h={horizon} exceeds energy.max_horizon={self.config.max_horizon}"
            )
        tokens = jax.vmap(self.action_proj)(actions.astype(self.dtype))
        tokens = tokens + sinusoidal_encoding(horizon, self.config.hidden)
        if self.time_proj is not None:
            t = jnp.zeros((), self.dtype) if t is None else jnp.asarray(t, self.dtype)
            tokens = tokens + self.time_proj(posemb_sincos(t, self.config.hidden))
        elif t is not None:
            raise ValueError("a flow time t was passed to an energy without time conditioning; set "
                             "energy.time_conditioning=true (and train it) or pass t=None")
        tokens = self.action_dropout(tokens, key=key, inference=inference or key is None)
        return jax.vmap(self.query)(tokens)

    def step_energies(self, encoding: ContextEncoding, queries: Float[Array, "h d"]) -> Float[Array, " h"]:
        """Per-step energies e_t from a context encoding and action queries."""
        attended = _multihead_attention(queries, encoding.keys, encoding.values, encoding.mask, self.config.num_heads)
        raw = jax.vmap(self.head)(jax.vmap(self.attn_out)(attended))[:, 0]
        slope, scale, offset = self.config.output_params
        if self.config.output == "sigmoid":
            return scale * jax.nn.sigmoid(slope * raw) + offset
        if self.config.output == "softplus":
            return scale * jax.nn.softplus(slope * raw) + offset
        return scale * (slope * raw) + offset

    def score(
        self,
        encoding: ContextEncoding,
        actions: Actions,
        t: FlowTime = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> Scalar:
        """E from a pre-computed context encoding; equals `self(context, actions, mask, t)`."""
        queries = self.encode_actions(actions, t, key=key, inference=inference)
        return jnp.mean(self.step_energies(encoding, queries))

    def per_step(
        self,
        context: Context,
        actions: Actions,
        context_mask: ContextMask,
        t: FlowTime = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> Float[Array, " h"]:
        """Per-step energies (h,); their mean is E."""
        queries = self.encode_actions(actions, t, key=key, inference=inference)
        return self.step_energies(self.encode_context(context, context_mask), queries)

    def __call__(
        self,
        context: Context,
        actions: Actions,
        context_mask: ContextMask,
        t: FlowTime = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> Scalar:
        return jnp.mean(self.per_step(context, actions, context_mask, t, key=key, inference=inference))
