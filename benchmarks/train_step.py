"""Energy-loss overhead of the training step (issue 5): energy_only step vs the backbone forward alone.

Two measurements, side by side in one run:
1. Wall time on this machine at a CPU-sized policy (`Pi0Config.tiny`, 3 cameras): the backbone's
   prefix forward alone, the energy_only step (frozen backbone under stop_gradient + energy
   InfoNCE value-and-grad + AdamW) and the monitor step (flow loss trained, energy logged).
2. FLOPs at the real shape from XLA's cost analysis, nothing executed: openpi's Pi0 (gemma_2b +
   gemma_300m, SigLIP So400m, 3 x 224 px, 48 prompt tokens -> 816 prefix tokens, bf16) prefix
   forward at batch 32 vs the energy head's in-batch InfoNCE value-and-grad at the seed's shape
   (B=32, S=816, c=2048, h=50, a=7, hidden 512). On an accelerator running both near the same
   utilization, the FLOP ratio is the step-time overhead (seed 000 measured 15% on an A100).

3. With `--policy-samples`: the energy_only step at the metaworld_energy shape (state-only tiny Pi0,
   72 prompt tokens, horizon 10, b=64) with the in-batch InfoNCE vs `loss.kind: policy_softmax`, which
   draws K=8 chunks per frame from the frozen policy inside the step, and the sampling alone (what a
   precomputed sample cache would save per step).

    python benchmarks/train_step.py [--quick] [--skip-real] [--policy-samples]
"""

from __future__ import annotations

import argparse
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from _common import compiled_stats, emit, machine, policy_batch, time_interleaved
from eqx_energy import EnergyConfig, EnergyModel
from eqx_energy.losses import infonce_inbatch
from eqx_energy.policy.pi0 import Observation, Pi0, Pi0Config, init_pi0
from eqx_energy.train.config import LossConfig, OptimConfig, TrainConfig, load_config
from eqx_energy.train.model import RunModel, trainable_spec
from eqx_energy.train.optim import group_labels, make_optimizer
from eqx_energy.train.step import init_state, make_train_step


def measured(batch_size: int, repeats: int) -> dict:
    cfg = Pi0Config.tiny()
    key = jax.random.key(0)
    policy = init_pi0(cfg, key=key)
    energy_cfg = EnergyConfig(context_dim=cfg.prefix_width, action_dim=4, hidden=64, num_heads=4, output="softplus")
    model = RunModel(policy=policy, energy=EnergyModel(energy_cfg, key=key))
    batch = jax.tree.map(jnp.asarray, policy_batch(cfg, batch_size, np.random.default_rng(0)))
    obs = Observation.from_dict(batch)

    forward = eqx.filter_jit(lambda p, o: p.prefix_features(o))
    steps = {}
    for mode in ("energy_only", "monitor"):
        trainable, frozen = eqx.partition(model, trainable_spec(model, mode))
        params = eqx.filter(trainable, eqx.is_inexact_array)
        optimizer = make_optimizer(OptimConfig(warmup_steps=1), group_labels(params), total_steps=1000)
        step = make_train_step(optimizer, mode=mode, loss_cfg=LossConfig())
        state = init_state(trainable, optimizer, ema=False)
        # the step donates its state: hand it a fresh copy every call
        steps[mode] = functools.partial(
            lambda step, frozen, state: step(frozen, jax.tree.map(jnp.copy, state), batch, key)[1]["loss"],
            step, frozen, state,
        )
    times = time_interleaved(
        {"backbone_forward": lambda: forward(policy, obs), **{f"{m}_step": f for m, f in steps.items()}},
        repeats=repeats,
    )
    return {
        "shape": f"tiny Pi0 (3 cams x {cfg.image_resolution}px, prefix {cfg.prefix_len}), b={batch_size}",
        **{f"{k}_s": v for k, v in times.items()},
        "energy_only_vs_forward": times["energy_only_step"] / times["backbone_forward"],
        "monitor_vs_energy_only": times["monitor_step"] / times["energy_only_step"],
    }


def policy_sample_step(repeats: int, *, batch_size: int = 64, num_samples: int = 8) -> dict:
    """Seconds per energy_only step at the metaworld_energy shape: in-batch InfoNCE vs policy_softmax
    with K on-the-fly samples (10 and 5 flow steps), and K-sample drawing alone."""
    cfg = load_config(TrainConfig, "metaworld_energy", overrides=["data.root=unused"])
    key = jax.random.key(0)
    model = RunModel(policy=init_pi0(cfg.policy.model, key=key), energy=EnergyModel(cfg.energy, key=key))
    batch = jax.tree.map(jnp.asarray, policy_batch(cfg.policy.model, batch_size, np.random.default_rng(0)))
    trainable, frozen = eqx.partition(model, trainable_spec(model, "energy_only"))
    params = eqx.filter(trainable, eqx.is_inexact_array)
    optimizer = make_optimizer(cfg.optim, group_labels(params), total_steps=1000)
    state = init_state(trainable, optimizer, ema=False)
    losses = {
        "inbatch": LossConfig(),
        "policy_k8_flow10": LossConfig(kind="policy_softmax", num_policy_samples=num_samples, policy_sample_steps=10),
        "policy_k8_flow5": LossConfig(kind="policy_softmax", num_policy_samples=num_samples, policy_sample_steps=5),
    }
    fns = {}
    for name, loss_cfg in losses.items():
        step = make_train_step(optimizer, mode="energy_only", loss_cfg=loss_cfg)
        fns[f"{name}_step"] = functools.partial(
            lambda step: step(frozen, jax.tree.map(jnp.copy, state), batch, key)[1]["loss"], step
        )
    obs = Observation.from_dict(batch)
    fns["sampling_k8_flow10"] = lambda: model.policy.sample_actions(key, obs, 10, num_samples=num_samples)[0]
    times = time_interleaved(fns, repeats=repeats)
    return {
        "policy_shape": f"metaworld_energy tiny Pi0 (state-only, prefix {cfg.policy.model.prefix_len}), b={batch_size}, "
        f"h={cfg.policy.model.action_horizon}, K={num_samples}",
        **{f"{k}_s": v for k, v in times.items()},
        "policy_k8_flow10_vs_inbatch": times["policy_k8_flow10_step"] / times["inbatch_step"],
    }


def real_shape_flops(batch_size: int) -> dict:
    """FLOPs of the real Pi0 prefix forward vs the energy loss's value-and-grad (compiled, not run)."""
    cfg = Pi0Config()
    abstract_policy = eqx.filter_eval_shape(Pi0, cfg, key=jax.random.key(0))
    is_leaf = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    params, static = eqx.partition(abstract_policy, is_leaf)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    batch = policy_batch(cfg, 1, np.random.default_rng(0))
    obs = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype), batch)
    del obs["actions"]

    def forward(params, obs):
        return eqx.combine(params, static).prefix_features(Observation.from_dict(obs))[0]

    _, backbone = compiled_stats(jax.jit(forward), params, obs)

    energy_cfg = EnergyConfig(context_dim=2048, action_dim=7, hidden=512, num_heads=8)
    energy = eqx.filter_eval_shape(EnergyModel, energy_cfg, key=jax.random.key(0))
    e_params, e_static = eqx.partition(energy, is_leaf)
    s = cfg.prefix_len
    context = jax.ShapeDtypeStruct((batch_size, s, 2048), jnp.float32)
    actions = jax.ShapeDtypeStruct((batch_size, 50, 7), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch_size, s), jnp.bool_)

    def energy_loss(p, c, a, m):
        # unchunked: XLA's cost analysis counts a lax.map body once, so chunking would hide FLOPs
        return jax.value_and_grad(lambda p: infonce_inbatch(eqx.combine(p, e_static), c, a, m, tau=0.5)[0])(p)

    _, head = compiled_stats(jax.jit(energy_loss), e_params, context, actions, mask)
    return {
        "real_prefix_tokens": s,
        "real_backbone_forward_tflops": backbone["flops"] / 1e12,
        "real_energy_loss_grad_tflops": head["flops"] / 1e12,
        "real_energy_overhead_flops": head["flops"] / backbone["flops"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    parser.add_argument("--skip-real", action="store_true", help="skip compiling the real-size Pi0 (takes minutes)")
    parser.add_argument("--policy-samples", action="store_true", help="only the policy-sample step at the metaworld shape")
    args = parser.parse_args()
    result = {"benchmark": "train_step", **machine()}
    if args.policy_samples:
        result.update(policy_sample_step(repeats=5))
    else:
        result.update(measured(batch_size=8 if args.quick else 16, repeats=5 if args.quick else 7))
    if not (args.skip_real or args.policy_samples):
        result.update(real_shape_flops(batch_size=32))
    for k, v in result.items():
        print(f"{k:>32}: {v:.4g}" if isinstance(v, float) else f"{k:>32}: {v}")
    emit(result)


if __name__ == "__main__":
    main()
