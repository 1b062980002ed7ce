"""One training step for the three modes (seed 000), over a partitioned RunModel.

    energy_only   L = L_E(stop_grad(prefix(obs)), a)                    only energy leaves move
    joint         L = L_flow + w L_E(prefix, a)   (prefix under stop_grad unless
                  train.energy_grad_to_backbone)                        policy and energy move
    monitor       L = L_flow; L_E computed on stop_grad(prefix), logged  only the policy moves

L_E is the configured energy loss (eqx_energy.losses) on the first `energy.action_dim` dims of
the normalized, padded batch actions. The policy-sample kinds (policy_softmax, policy_ranking) draw
`loss.num_policy_samples` chunks per frame on the fly, under stop_gradient: in energy_only mode from
the frozen policy, whose sampling pass also gives the context (one prefix pass); in joint and
monitor modes from the current policy, in a second prefix pass. Non-finite loss or gradients skip the update (params,
optimizer state and EMA unchanged) and are counted. Batches are dicts in openpi's model layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from eqx_energy import losses
from eqx_energy.energy import EnergyModel
from eqx_energy.policy.pi0 import Observation
from eqx_energy.train.config import LossConfig
from eqx_energy.train.model import Mode, RunModel
from eqx_energy.train.optim import Optimizer, guarded_update


class TrainState(eqx.Module):
    """Everything a step changes: trainable arrays, optimizer state, EMA, counters."""

    params: PyTree
    opt_state: PyTree
    ema: PyTree | None
    step: Int[Array, ""]
    skipped: Int[Array, ""]


def init_state(trainable: PyTree, optimizer: Optimizer, *, ema: bool) -> TrainState:
    """Fresh state; its params are copies, so donating the state never deletes the model's arrays."""
    params = jax.tree.map(jnp.copy, eqx.filter(trainable, eqx.is_inexact_array))
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        ema=jax.tree.map(jnp.copy, params) if ema else None,
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


POLICY_SAMPLE_KINDS = ("policy_softmax", "policy_ranking")


def energy_loss_fn(cfg: LossConfig) -> Callable[..., tuple[Float[Array, ""], dict]]:
    """(energy, context, actions, mask, key, samples) -> (loss, metrics) for `loss.kind`; `samples`
    (b k h a) are the policy's chunks, needed by the POLICY_SAMPLE_KINDS only."""
    sampler = losses.NegativeSampler(sigmas=cfg.negative_sigmas, num_shuffle=1, num_swap=1)

    def fn(energy: EnergyModel, context, actions, mask, key: PRNGKeyArray, samples=None):
        neg_key, drop_key = jax.random.split(key)
        tau = cfg.tau if energy.log_tau is None else jnp.exp(energy.log_tau)
        if cfg.kind in POLICY_SAMPLE_KINDS and samples is None:
            raise ValueError(f"loss.kind={cfg.kind} needs the policy's samples (b k h a); pass samples=")
        if cfg.kind == "policy_softmax":
            t = None
            if cfg.noise_t is not None:
                t = jax.random.uniform(neg_key, (actions.shape[0],), minval=cfg.noise_t[0], maxval=cfg.noise_t[1])
            return losses.policy_softmax(energy, context, actions, mask, samples, tau=tau, beta=cfg.beta, t=t, key=drop_key)
        if cfg.kind == "policy_ranking":
            return losses.policy_ranking(
                energy, context, actions, mask, samples, tau=tau, weighted=cfg.rank_weighted, key=drop_key
            )
        if cfg.kind == "infonce_inbatch" and cfg.num_negatives is not None:
            index = losses.sample_negative_indices(neg_key, actions.shape[0], cfg.num_negatives)
            return losses.infonce_sampled(energy, context, actions, mask, index, tau=tau, key=drop_key)
        if cfg.kind == "infonce_inbatch":
            return losses.infonce_inbatch(energy, context, actions, mask, tau=tau, key=drop_key, chunk=cfg.chunk)
        negatives = sampler(neg_key, actions)
        if cfg.kind == "infonce_explicit":
            return losses.infonce_explicit(energy, context, actions, mask, negatives, tau=tau, key=drop_key)
        if cfg.kind == "hinge":
            return losses.hinge(energy, context, actions, mask, negatives, margin=cfg.margin, key=drop_key)
        return losses.mixed(
            energy, context, actions, mask, negatives, tau=tau, margin=cfg.margin,
            infonce_weight=cfg.weights[0], margin_weight=cfg.weights[1], key=drop_key, chunk=cfg.chunk,
        )

    return fn


def _policy_samples(policy, key: PRNGKeyArray, obs: Observation, cfg: LossConfig):
    """K chunks per frame from `policy` (one prefix pass), under stop_gradient: (b k h p) and the
    prefix features + mask of that pass."""
    return jax.lax.stop_gradient(
        policy.sample_actions(key, obs, cfg.policy_sample_steps, num_samples=cfg.num_policy_samples)
    )


def _loss(trainable, frozen, batch, key, *, mode: Mode, loss_cfg: LossConfig, grad_to_backbone: bool):
    model: RunModel = eqx.combine(trainable, frozen)
    obs = Observation.from_dict(batch)
    actions = batch["actions"].astype(jnp.float32)
    flow_key, energy_key = jax.random.split(key)
    sample_key = jax.random.fold_in(key, 1)  # apart from the split, so the other kinds draw as before
    action_dim = model.energy.action_dim
    samples = None
    if mode == "energy_only" and loss_cfg.kind in POLICY_SAMPLE_KINDS:  # the sampling pass's prefix is the context
        samples, context, mask = _policy_samples(model.policy, sample_key, obs, loss_cfg)
        flow = None
    elif mode == "energy_only":
        context, mask = jax.lax.stop_gradient(model.policy.prefix_features(obs))
        flow = None
    else:
        flow_per_element, context, mask = model.policy.compute_loss_and_prefix(flow_key, obs, actions, train=True)
        flow = jnp.mean(flow_per_element)
        if mode == "monitor" or not grad_to_backbone:
            context = jax.lax.stop_gradient(context)
        if loss_cfg.kind in POLICY_SAMPLE_KINDS:  # the current policy's samples, a constant for the loss
            samples = _policy_samples(model.policy, sample_key, obs, loss_cfg)[0]
    if samples is not None:
        samples = samples[..., :action_dim]
    energy_loss, metrics = energy_loss_fn(loss_cfg)(
        model.energy, context, actions[..., :action_dim], mask, energy_key, samples
    )
    metrics = {f"energy/{k}": v for k, v in metrics.items()}
    if model.energy.log_tau is not None:
        metrics["energy/tau"] = jnp.exp(model.energy.log_tau)
    if mode == "energy_only":
        total = energy_loss
    else:
        metrics["flow_loss"] = flow
        total = flow if mode == "monitor" else flow + loss_cfg.energy_weight * energy_loss
    metrics["loss"] = total
    return total, metrics


@functools.lru_cache(maxsize=8)  # one jitted step (and compiled program) per optimizer and loss
def make_train_step(
    optimizer: Optimizer,
    *,
    mode: Mode,
    loss_cfg: LossConfig,
    grad_to_backbone: bool = False,
    ema_decay: float | None = None,
) -> Callable[[PyTree, TrainState, dict[str, Any], PRNGKeyArray], tuple[TrainState, dict]]:
    """`step(frozen, state, batch, key) -> (state, metrics)`, jitted; state and batch are donated.

    Callers pass key = fold_in(train_key, step), so a resumed run draws the same randomness. The new
    state keeps the old one's shardings: left to itself the compiler FSDP-shards small replicated
    leaves too, and the next step, given a state laid out anew, compiles again.
    """
    loss = functools.partial(_loss, mode=mode, loss_cfg=loss_cfg, grad_to_backbone=grad_to_backbone)

    def step(frozen: PyTree, state: TrainState, batch: dict[str, Any], key: PRNGKeyArray):
        return jitted_step(frozen, state, batch, key, jax.tree.map(lambda x: x.sharding, state))

    @eqx.filter_jit(donate="all-except-first")
    def jitted_step(frozen: PyTree, state: TrainState, batch: dict[str, Any], key: PRNGKeyArray, shardings: PyTree):
        (total, metrics), grads = eqx.filter_value_and_grad(loss, has_aux=True)(state.params, frozen, batch, key)
        update = guarded_update(
            optimizer, grads, state.opt_state, state.params,
            loss=total, skipped=state.skipped, ema=state.ema,
            ema_decay=None if state.ema is None else ema_decay,
        )
        metrics = {
            **metrics,
            "grad_norm": optax.tree.norm(grads),
            "skipped_steps": update.skipped,
            **{f"lr/{group}": lr for group, lr in optimizer.learning_rates(state.opt_state).items()},
        }
        new_state = TrainState(update.params, update.opt_state, update.ema, state.step + 1, update.skipped)
        return eqx.filter_shard(new_state, shardings), metrics

    return step
