"""A small learnable context -> action-chunk task for tests, benchmarks and the quick demo.

Each example draws a goal g ~ N(0, I_a). The context is `s` tokens of noise, one of which (at a
random valid position) carries W g through a fixed random lift W (a -> c); trailing tokens are
padding (mask False) and hold large junk so a mask bug shows. The expert chunk moves linearly to
the goal: a_t = g (t + 1) / h. A matching (context, chunk) pair is the positive; the task is
learnable because the chunk is a function of the context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray


def synthetic_batch(
    key: PRNGKeyArray,
    batch: int,
    *,
    tokens: int = 8,
    context_dim: int = 32,
    horizon: int = 8,
    action_dim: int = 4,
    valid_tokens: int | None = None,
) -> tuple[Float[Array, "b s c"], Float[Array, "b h a"], Bool[Array, "b s"]]:
    """(context, expert actions, context mask) for `batch` examples."""
    lift_key = jax.random.key(1234)  # the task itself is fixed; only the examples vary with `key`
    lift = jax.random.normal(lift_key, (action_dim, context_dim)) / jnp.sqrt(action_dim)
    goal_key, noise_key, pos_key = jax.random.split(key, 3)
    valid = tokens if valid_tokens is None else valid_tokens
    goals = jax.random.normal(goal_key, (batch, action_dim))
    context = 0.1 * jax.random.normal(noise_key, (batch, tokens, context_dim))
    position = jax.random.randint(pos_key, (batch,), 0, valid)
    at_goal = jnp.arange(tokens)[None, :] == position[:, None]
    context = jnp.where(at_goal[..., None], (goals @ lift)[:, None, :], context)
    mask = jnp.broadcast_to(jnp.arange(tokens) < valid, (batch, tokens))
    context = jnp.where(mask[..., None], context, 100.0)
    ramp = jnp.arange(1, horizon + 1, dtype=jnp.float32) / horizon
    actions = goals[:, None, :] * ramp[None, :, None]
    return context, actions, mask
