"""Pi0 and Pi0.5: a PaliGemma prefix (images + prompt) and a flow-matching action expert (openpi.md §2).

Flow matching with openpi's time convention (t = 1 is noise, t = 0 data):

    x_t = t eps + (1 - t) a,   u_t = eps - a,   t ~ Beta(1.5, 1) * 0.999 + 0.001
    loss = mean_p (v_theta(x_t, t | obs) - u_t)^2          per (b, h); padded action dims included
    sampling: x <- x + dt v(x, t), t <- t + dt, dt = -1/num_steps, from t = 1 (noise)

Prefix = [SigLIP tokens per camera (base, left wrist, right wrist)] + [prompt embedding], all
bidirectional among valid tokens. `image_keys=()` is a state-only policy: no SigLIP, the prefix is the
prompt alone (with Pi0.5's discrete state it still sees the state). Pi0 suffix = [state token] + H action tokens (action+time MLP);
Pi0.5 suffix = H action tokens, the time enters the expert through adaptive RMSNorm. The prefix never
sees the suffix, so its output ("prefix features", final-normed, (b s d)) is the same in the training
forward, the KV-cache fill pass and `prefix_features`: it is what the energy head reads.

Public methods take a batched `Observation` and one key, as openpi's do; masks are True = valid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from eqx_energy.policy._augment import augment_images
from eqx_energy.policy._layers import Dense
from eqx_energy.policy.gemma import PALIGEMMA_VOCAB_SIZE, Gemma, attention_mask, gemma_config
from eqx_energy.policy.siglip import Siglip, siglip_config

IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    paligemma_variant: str = "gemma_2b"  # expert 0 (VLM): gemma_2b | gemma_300m | dummy | tiny | tiny_expert
    action_expert_variant: str = "gemma_300m"  # expert 1 (action expert)
    siglip_variant: str = "so400m"  # so400m (openpi) | tiny (CPU demo)
    pi05: bool = False  # Pi0.5: no state token, adaptive-RMSNorm time conditioning
    action_dim: int = 32  # p: state and actions are zero-padded to this
    action_horizon: int = 50  # h
    max_token_len: int | None = None  # prompt length L; None -> 48 (Pi0) or 200 (Pi0.5), as openpi
    image_resolution: int = 224  # square images (openpi: 224)
    image_keys: tuple[str, ...] = IMAGE_KEYS  # prefix order of the cameras; () = state-only (no SigLIP)
    vocab_size: int = PALIGEMMA_VOCAB_SIZE  # rows of the token table (a project tokenizer: a few hundred)
    dtype: str = "bfloat16"  # activation dtype (openpi's Pi0Config.dtype)
    remat: bool = False  # rematerialise each scanned layer in the backward pass (saves memory)

    def __post_init__(self):
        if self.max_token_len is None:
            object.__setattr__(self, "max_token_len", 200 if self.pi05 else 48)
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"Pi0Config.dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        vlm, expert = gemma_config(self.paligemma_variant), gemma_config(self.action_expert_variant)
        siglip_config(self.siglip_variant)
        if (vlm.depth, vlm.num_heads, vlm.num_kv_heads, vlm.head_dim) != (expert.depth, expert.num_heads, expert.num_kv_heads, expert.head_dim):
            raise ValueError(
                f"paligemma_variant={self.paligemma_variant!r} and action_expert_variant={self.action_expert_variant!r} "
                "must share depth, num_heads, num_kv_heads and head_dim (e.g. gemma_2b + gemma_300m, dummy + dummy, tiny + tiny_expert)"
            )

    @classmethod
    def dummy(cls, **overrides) -> Pi0Config:
        """openpi's `debug` model: Gemma width 64 for both experts, SigLIP So400m/14 unchanged."""
        return cls(**{"paligemma_variant": "dummy", "action_expert_variant": "dummy", **overrides})

    @classmethod
    def tiny(cls, **overrides) -> Pi0Config:
        """A CPU-sized policy for tests and the demo: tiny SigLIP at 64 px, 2-layer experts, f32, small vocab."""
        defaults = dict(
            paligemma_variant="tiny",
            action_expert_variant="tiny_expert",
            siglip_variant="tiny",
            action_horizon=10,
            max_token_len=16,
            image_resolution=64,
            vocab_size=512,
            dtype="float32",
        )
        return cls(**{**defaults, **overrides})

    @property
    def tokens_per_image(self) -> int:
        return (self.image_resolution // siglip_config(self.siglip_variant).patch_size) ** 2

    @property
    def prefix_len(self) -> int:
        return len(self.image_keys) * self.tokens_per_image + self.max_token_len

    @property
    def prefix_width(self) -> int:
        return gemma_config(self.paligemma_variant).width


class Observation(eqx.Module):
    """A batch in openpi's model layout (§4.4): images float in [-1, 1], masks True = valid.

    A state-only batch has empty `images` / `image_masks` (its dict has no `image` key)."""

    images: dict[str, Float[Array, "b H W 3"]]
    image_masks: dict[str, Bool[Array, " b"]]
    state: Float[Array, "b p"]
    tokenized_prompt: Int[Array, "b l"]
    tokenized_prompt_mask: Bool[Array, "b l"]

    @classmethod
    def from_dict(cls, data: dict) -> Observation:
        """From openpi's batch dict (`image/<cam>`, `image_mask/<cam>`, ...); uint8 images become x/255*2-1."""

        def image(x):
            x = jnp.asarray(x)
            return x.astype(jnp.float32) / 255.0 * 2.0 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)

        images = {k: image(v) for k, v in data.get("image", {}).items()}
        b = data["state"].shape[0]
        masks = {k: jnp.asarray(data.get("image_mask", {}).get(k, np.ones((b,), bool)), bool) for k in images}
        return cls(
            images=images,
            image_masks=masks,
            state=jnp.asarray(data["state"], jnp.float32),
            tokenized_prompt=jnp.asarray(data["tokenized_prompt"], jnp.int32),
            tokenized_prompt_mask=jnp.asarray(data["tokenized_prompt_mask"], bool),
        )


def posemb_sincos(t: Float[Array, ""], dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> Float[Array, " d"]:
    """[sin(2 pi t / T_j) | cos(2 pi t / T_j)], T_j log-spaced from min_period to max_period, j < dim/2."""
    period = min_period * (max_period / min_period) ** jnp.linspace(0.0, 1.0, dim // 2)
    arg = t.astype(jnp.float32) * (1.0 / period * 2 * jnp.pi)
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])


class Prefix(eqx.Module):
    """The prefix pass, computed once per observation: what each flow step and the energy read."""

    tokens: Float[Array, "b s d"]
    mask: Bool[Array, "b s"]
    features: Float[Array, "b s c"]  # final-normed prefix output, f32: the energy's context
    kv: tuple[Float[Array, "b l s k e"], Float[Array, "b l s k e"]]


# guide(x_t, a_hat, t, dt) -> (displacement added to the Euler step, aux stacked over steps)
Guide = Callable[[Array, Array, Array, float], tuple[Array, PyTree]]


class Pi0(eqx.Module):
    """Pi0 / Pi0.5 (see the module docstring). Field names follow openpi's parameter tree."""

    img: Siglip | None
    llm: Gemma
    action_in_proj: Dense
    action_out_proj: Dense
    state_proj: Dense | None
    action_time_mlp_in: Dense | None
    action_time_mlp_out: Dense | None
    time_mlp_in: Dense | None
    time_mlp_out: Dense | None
    config: Pi0Config = eqx.field(static=True)

    def __init__(self, config: Pi0Config, *, key: PRNGKeyArray):
        ikey, lkey, inkey, outkey, skey, m1key, m2key = jax.random.split(key, 7)
        vlm, expert = gemma_config(config.paligemma_variant), gemma_config(config.action_expert_variant)
        d, p = expert.width, config.action_dim
        self.img = (
            Siglip(siglip_config(config.siglip_variant), config.image_resolution, vlm.width, dtype=config.dtype, remat=config.remat, key=ikey)
            if config.image_keys
            else None
        )
        self.llm = Gemma(
            (vlm, expert),
            vocab_size=config.vocab_size,
            adaptive=(False, config.pi05),
            embed_dtype=config.dtype,
            remat=config.remat,
            key=lkey,
        )
        self.action_in_proj = Dense(p, d, key=inkey)
        self.action_out_proj = Dense(d, p, key=outkey)
        if config.pi05:
            self.state_proj = self.action_time_mlp_in = self.action_time_mlp_out = None
            self.time_mlp_in, self.time_mlp_out = Dense(d, d, key=m1key), Dense(d, d, key=m2key)
        else:
            self.state_proj = Dense(p, d, key=skey)
            self.action_time_mlp_in, self.action_time_mlp_out = Dense(2 * d, d, key=m1key), Dense(d, d, key=m2key)
            self.time_mlp_in = self.time_mlp_out = None
        self.config = config

    # ---- single-example pieces --------------------------------------------------------------------------

    def _embed_prefix_one(self, images, image_masks, tokens, token_mask):
        parts, masks = [], []
        for cam in self.config.image_keys:
            t = self.img(images[cam])
            parts.append(t)
            masks.append(jnp.broadcast_to(image_masks[cam], (t.shape[0],)))
        parts.append(self.llm.embed(tokens))
        masks.append(token_mask)
        return jnp.concatenate(parts), jnp.concatenate(masks)

    def _embed_suffix_one(self, state, x_t, t):
        h = self.config.action_horizon
        action_tokens = self.action_in_proj(x_t)
        time_emb = posemb_sincos(t, self.action_in_proj.kernel.shape[1])
        if self.config.pi05:
            cond = jax.nn.swish(self.time_mlp_out(jax.nn.swish(self.time_mlp_in(time_emb))))
            return action_tokens, jnp.ones((h,), bool), cond
        time_tokens = jnp.broadcast_to(time_emb[None], (h, time_emb.shape[0]))
        mixed = self.action_time_mlp_out(jax.nn.swish(self.action_time_mlp_in(jnp.concatenate([action_tokens, time_tokens], -1))))
        state_token = self.state_proj(state)[None]
        return jnp.concatenate([state_token, mixed]), jnp.ones((h + 1,), bool), None

    def _suffix_ar(self) -> np.ndarray:
        h = self.config.action_horizon
        return np.array(([] if self.config.pi05 else [True]) + [True] + [False] * (h - 1))

    def _velocity(self, suffix_out):
        return self.action_out_proj(suffix_out[-self.config.action_horizon :])

    def _prefix_pass(self, prefix_tokens, prefix_mask):
        mask = attention_mask(prefix_mask, jnp.zeros_like(prefix_mask))
        positions = jnp.cumsum(prefix_mask.astype(jnp.int32)) - 1
        (out, _), kv = self.llm((prefix_tokens, None), positions, mask)
        return out, kv

    def _joint_pass(self, prefix_tokens, prefix_mask, suffix_tokens, suffix_mask, cond):
        input_mask = jnp.concatenate([prefix_mask, suffix_mask])
        ar = jnp.concatenate([jnp.zeros_like(prefix_mask), jnp.asarray(self._suffix_ar())])
        positions = jnp.cumsum(input_mask.astype(jnp.int32)) - 1
        (prefix_out, suffix_out), _ = self.llm(
            (prefix_tokens, suffix_tokens), positions, attention_mask(input_mask, ar), (None, cond)
        )
        return prefix_out, suffix_out

    def _cached_suffix_pass(self, kv, prefix_mask, suffix_tokens, suffix_mask, cond):
        s = suffix_tokens.shape[0]
        mask = jnp.concatenate(
            [jnp.broadcast_to(prefix_mask[None], (s, prefix_mask.shape[0])), attention_mask(suffix_mask, jnp.asarray(self._suffix_ar()))], -1
        )
        positions = jnp.sum(prefix_mask.astype(jnp.int32)) + jnp.cumsum(suffix_mask.astype(jnp.int32)) - 1
        (_, suffix_out), _ = self.llm((None, suffix_tokens), positions, mask, (None, cond), kv_cache=kv)
        return suffix_out

    def _check(self, obs: Observation) -> None:
        missing = [k for k in self.config.image_keys if k not in obs.images or k not in obs.image_masks]
        if missing:
            raise ValueError(f"observation lacks images/image_masks for {missing}; expected cameras {list(self.config.image_keys)}")
        r = self.config.image_resolution
        for k in self.config.image_keys:
            if obs.images[k].shape[1:] != (r, r, 3):
                raise ValueError(f"images[{k!r}] has shape {obs.images[k].shape}; expected (b, {r}, {r}, 3): resize in the data transforms")
        if obs.tokenized_prompt.shape[1] != self.config.max_token_len:
            raise ValueError(
                f"tokenized_prompt has length {obs.tokenized_prompt.shape[1]}; expected max_token_len={self.config.max_token_len}: "
                "tokenize with the same max_len as the config"
            )
        if obs.state.shape[1] != self.config.action_dim:
            raise ValueError(f"state has {obs.state.shape[1]} dims; expected action_dim={self.config.action_dim} (zero-pad it)")

    # ---- batched public API ---------------------------------------------------------------------------

    def embed_prefix(self, obs: Observation) -> tuple[Float[Array, "b s d"], Bool[Array, "b s"], Bool[Array, " s"]]:
        """Prefix tokens (camera tokens in `image_keys` order, then the scaled prompt embedding), valid mask and
        the autoregressive mask (all False: the prefix is bidirectional)."""
        self._check(obs)
        tokens, mask = jax.vmap(self._embed_prefix_one)(obs.images, obs.image_masks, obs.tokenized_prompt, obs.tokenized_prompt_mask)
        return tokens, mask, jnp.zeros((tokens.shape[1],), bool)

    def embed_suffix(
        self, obs: Observation, x_t: Float[Array, "b h p"], t: Float[Array, " b"]
    ) -> tuple[Float[Array, "b _ _"], Bool[Array, "b _"], Bool[Array, " _"], Float[Array, "b _"] | None]:
        """Suffix tokens, mask, ar mask ([True] + [False]*(h-1), after a [True] state token for Pi0) and the
        adaRMS condition (Pi0.5; None for Pi0)."""
        tokens, mask, cond = jax.vmap(self._embed_suffix_one)(obs.state, x_t, t)
        return tokens, mask, jnp.asarray(self._suffix_ar()), cond

    @eqx.filter_jit
    def prefix_features(self, obs: Observation) -> tuple[Float[Array, "b s c"], Bool[Array, "b s"]]:
        """The VLM's final-normed prefix output (f32) and its mask: the energy head's context."""
        prefix = self.prefill(obs)
        return prefix.features, prefix.mask

    def compute_loss_and_prefix(
        self, key: PRNGKeyArray, obs: Observation, actions: Float[Array, "b h p"], *, train: bool = False
    ) -> tuple[Float[Array, "b h"], Float[Array, "b s c"], Bool[Array, "b s"]]:
        """Per-element flow loss (b h) and the prefix features/mask of the same forward pass."""
        self._check(obs)
        aug_key, noise_key, time_key = jax.random.split(key, 3)
        if train:
            obs = augment_images(aug_key, obs)
        b = actions.shape[0]
        noise = jax.random.normal(noise_key, actions.shape)
        t = jax.random.beta(time_key, 1.5, 1, (b,)) * 0.999 + 0.001
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        u_t = noise - actions
        prefix_tokens, prefix_mask, _ = self.embed_prefix(obs)
        suffix_tokens, suffix_mask, _, cond = self.embed_suffix(obs, x_t, t)
        prefix_out, suffix_out = jax.vmap(self._joint_pass)(prefix_tokens, prefix_mask, suffix_tokens, suffix_mask, cond)
        v_t = jax.vmap(self._velocity)(suffix_out)
        return jnp.mean(jnp.square(v_t - u_t), axis=-1), prefix_out.astype(jnp.float32), prefix_mask

    def compute_loss(
        self, key: PRNGKeyArray, obs: Observation, actions: Float[Array, "b h p"], *, train: bool = False
    ) -> Float[Array, "b h"]:
        """Per-element flow-matching loss mean_p (v - (eps - a))^2, shape (b h)."""
        return self.compute_loss_and_prefix(key, obs, actions, train=train)[0]

    def prefill(self, obs: Observation) -> Prefix:
        """The prefix pass every flow step reads (tokens, mask, f32 features, per-layer KV cache)."""
        tokens, mask, _ = self.embed_prefix(obs)
        out, kv = jax.vmap(self._prefix_pass)(tokens, mask)
        return Prefix(tokens=tokens, mask=mask, features=out.astype(jnp.float32), kv=kv)

    def velocity(
        self, prefix: Prefix, state: Float[Array, "b p"], x_t: Float[Array, "b *n h p"], t: Float[Array, ""], *, kv_cache: bool = True
    ) -> Float[Array, "b *n h p"]:
        """v_theta(x_t, t | obs) for chunks (b h p), or for candidates (b n h p) that share their example's prefix.

        With `kv_cache` the suffix attends to the cached prefix keys/values (the n candidates read one cache,
        not n copies); without it each call runs the full prefix + suffix forward (the reference path)."""

        def one(tokens, mask, kv, state, x, t):
            suffix_tokens, suffix_mask, cond = self._embed_suffix_one(state, x, t)
            if kv_cache:
                return self._velocity(self._cached_suffix_pass(kv, mask, suffix_tokens, suffix_mask, cond))
            return self._velocity(self._joint_pass(tokens, mask, suffix_tokens, suffix_mask, cond)[1])

        if x_t.ndim == 4:
            one = jax.vmap(one, in_axes=(None, None, None, None, 0, 0))
        return jax.vmap(one)(prefix.tokens, prefix.mask, prefix.kv, state, x_t, jnp.broadcast_to(t, x_t.shape[:-2]))

    def integrate(
        self,
        prefix: Prefix,
        state: Float[Array, "b p"],
        noise: Float[Array, "b *n h p"],
        num_steps: int,
        *,
        kv_cache: bool = True,
        guide: Guide | None = None,
    ) -> tuple[Float[Array, "b *n h p"], PyTree]:
        """Euler from t=1 to t=0: x <- x + dt v(x, t) + guide(x, x - t v, t, dt)[0], dt = -1/num_steps.

        `guide(x_t, a_hat, t, dt) -> (displacement like x_t, aux)` sees the step's predicted clean chunk
        a_hat = x_t - t v; its aux values are stacked over the steps (None without a guide)."""
        dt = -1.0 / num_steps

        def step(carry, _):
            x_t, t = carry
            v_t = self.velocity(prefix, state, x_t, t, kv_cache=kv_cache)
            x_next = x_t + dt * v_t
            if guide is None:
                return (x_next, t + dt), None
            move, aux = guide(x_t, x_t - t * v_t, t, dt)
            return (x_next + move, t + dt), aux

        (x0, _), aux = jax.lax.scan(step, (noise, jnp.asarray(1.0, jnp.float32)), None, length=num_steps)
        return x0, aux

    def candidate_noise(self, key: PRNGKeyArray, batch: int, num_samples: int | None) -> Float[Array, "b *n h p"]:
        """N(0, I) start of the flow: (b h p) from `key`, or (b n h p) whose candidate i is what `key_i =
        jax.random.split(key, n)[i]` alone draws (so n candidates equal n plain calls with those keys)."""
        shape = (batch, self.config.action_horizon, self.config.action_dim)
        if num_samples is None:
            return jax.random.normal(key, shape)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (or None for one chunk per example), got {num_samples}")
        return jnp.moveaxis(jax.vmap(lambda k: jax.random.normal(k, shape))(jax.random.split(key, num_samples)), 0, 1)

    @eqx.filter_jit
    def sample_actions(
        self,
        key: PRNGKeyArray,
        obs: Observation,
        num_steps: int = 10,
        *,
        noise: Float[ArrayLike, "b *n h p"] | None = None,
        kv_cache: bool = True,
        num_samples: int | None = None,
    ) -> tuple[Float[Array, "b *n h p"], Float[Array, "b s c"], Bool[Array, "b s"]]:
        """Euler integration of the flow from t=1 (noise ~ N(0,1) from `key`, or `noise`) to t=0.

        With `kv_cache` the prefix runs once and each step runs only the suffix against its cached keys
        and values; without it every step runs the full prefix + suffix forward (the reference path).
        `num_samples=n` draws n candidates per example from that one prefix pass: actions (b n h p), noise
        as `candidate_noise`. Returns the actions in the model's normalized space and the prefix features
        (f32) + mask, once per example.
        """
        self._check(obs)
        if noise is None:
            x = self.candidate_noise(key, obs.state.shape[0], num_samples)
        else:
            x = jnp.asarray(noise, jnp.float32)
            if x.ndim != (3 if num_samples is None else 4) or (num_samples is not None and x.shape[1] != num_samples):
                raise ValueError(f"noise has shape {x.shape}; with num_samples={num_samples} expected "
                                 f"{'(b, h, p)' if num_samples is None else f'(b, {num_samples}, h, p)'}")
        prefix = self.prefill(obs)
        x0, _ = self.integrate(prefix, obs.state, x, num_steps, kv_cache=kv_cache)
        return x0, prefix.features, prefix.mask


def count_params(tree) -> int:
    """Number of scalars in the array leaves (works on `eqx.filter_eval_shape` output without allocating)."""
    leaves = jax.tree.leaves(eqx.filter(tree, lambda x: hasattr(x, "shape") and hasattr(x, "dtype")))
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in leaves))



def init_pi0(config: Pi0Config, *, key: PRNGKeyArray) -> Pi0:
    """`Pi0(config, key=key)` built in one XLA computation compiled without optimisation.

    Eager construction dispatches (and compiles) every random op separately, and an optimised compile
    of the whole init is ~10x slower than the init itself on a CPU; -O0 makes a tiny policy in seconds.
    """
    init = jax.jit(lambda k: Pi0(config, key=k))
    compiled = init.lower(key).compile(compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    return compiled(key)
