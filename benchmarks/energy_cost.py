"""FLOP share of the energy loss at the real Pi0 shape (issue 14): each loss option vs one prefix forward.

From XLA's cost analysis, nothing executed. The backbone is `train_step.real_shape_flops`'s: openpi's Pi0
prefix forward (gemma_2b, SigLIP So400m, 3 x 224 px, 816 prefix tokens, bf16) at batch b, lowered with
every layer scan unrolled (cost analysis counts a while-loop body once; rolled, it counts one layer per
stack). The energy loss is the training step's own (`train.step.energy_loss_fn`), value and gradient
w.r.t. the energy head (hidden 512, 8 heads, h=50, a=7, f32, dropout on), for:

    full        in-batch InfoNCE: b² (context, chunk) pairs, each attending over the s prefix tokens
    k{K}        loss.num_negatives=K: b (K + 1) pairs
    l{L}        energy.context_latents=L: the context pooled to L latents once, b² pairs over L tokens
    k{K}_l{L}   both

    python benchmarks/energy_cost.py [--batch 32] [--num-negatives 7] [--latents 16]

With `--rank RUN [RUN ...]`, instead: the held-out in-batch ranking of trained runs (their raw
parameters, not the EMA), to compare the options' accuracy. The `--frames` held-out frames
(offline_eval's loaders) are shuffled into batches of `--rank-batch`; per batch E_ij = E(c_i, a*_j)
for all pairs, accuracy = P_i[argmin_j E_ij = i], AUC = P[E_ij > E_ii] over j != i per row.

    python benchmarks/energy_cost.py --rank RUN_A RUN_B [--frames 640 --rank-batch 64]   (from the repo root:
                                                      a run's data.root is relative to it)
"""

from __future__ import annotations

import argparse
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from _common import compiled_stats, emit, machine, unrolled_scans
from eqx_energy import EnergyConfig, EnergyModel
from eqx_energy import offline_eval
from eqx_energy.checkpoints.load_run import load_run
from eqx_energy.losses import pairwise_energies
from eqx_energy.policy.pi0 import Observation
from eqx_energy.policy.pi0 import Pi0Config
from eqx_energy.train.config import LossConfig
from eqx_energy.train.step import energy_loss_fn
from train_step import real_shape_flops

ENERGY = EnergyConfig(context_dim=2048, action_dim=7, hidden=512, num_heads=8)
HORIZON = 50


def loss_flops(energy_cfg: EnergyConfig, loss_cfg: LossConfig, batch: int, tokens: int) -> float:
    """FLOPs of value_and_grad of the step's energy loss w.r.t. the energy parameters (compiled, not run)."""
    is_leaf = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    params, static = eqx.partition(eqx.filter_eval_shape(EnergyModel, energy_cfg, key=jax.random.key(0)), is_leaf)
    fn = energy_loss_fn(loss_cfg)

    def value_and_grad(p, context, actions, mask, key):
        return jax.value_and_grad(lambda p: fn(eqx.combine(p, static), context, actions, mask, key)[0])(p)

    args = (
        jax.ShapeDtypeStruct((batch, tokens, energy_cfg.context_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, HORIZON, energy_cfg.action_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, tokens), jnp.bool_),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
    )
    return compiled_stats(jax.jit(value_and_grad), params, *args)[1]["flops"]


@eqx.filter_jit
def _pair_matrix(model, batch: dict, actions):
    context, mask = model.policy.prefix_features(Observation.from_dict(batch))
    energy = model.energy
    encodings = jax.vmap(energy.encode_context)(context, mask)
    return pairwise_energies(energy, encodings, jax.vmap(energy.encode_actions)(actions))


def held_out_ranking(run_dir: str, frames: int, batch: int) -> dict:
    """In-batch accuracy and per-row AUC of a run's energy on its held-out frames (raw parameters)."""
    run = load_run(run_dir, use_ema=False)
    examples = offline_eval.load_frames(run, offline_eval.holdout_source(run, None, "holdout"), frames)
    order = np.random.default_rng(0).permutation(len(examples))  # mix episodes within a batch
    off = ~np.eye(batch, dtype=bool)
    accuracy, auc = [], []
    for start in range(0, len(examples) - batch + 1, batch):
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *[examples[i] for i in order[start : start + batch]])
        del stacked["action_valid"]
        actions = jnp.asarray(stacked.pop("actions"), jnp.float32)[..., : run.model.energy.action_dim]
        e = np.asarray(_pair_matrix(run.model, stacked, actions))
        gap = e - np.diag(e)[:, None]
        accuracy.append(np.mean(e.argmin(1) == np.arange(batch)))
        auc.append((np.sum((gap > 0) & off) + 0.5 * np.sum((gap == 0) & off)) / off.sum())
    return {"run": run_dir, "step": run.step, "frames": len(accuracy) * batch,
            "inbatch_accuracy": float(np.mean(accuracy)), "inbatch_auc": float(np.mean(auc))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--num-negatives", type=int, default=7, help="k of the sampled-negative variants")
    parser.add_argument("--latents", type=int, default=16, help="L of the pooled variants")
    parser.add_argument("--rank", nargs="+", metavar="RUN", help="held-out in-batch ranking of these runs instead")
    parser.add_argument("--frames", type=int, default=640)
    parser.add_argument("--rank-batch", type=int, default=64)
    args = parser.parse_args()
    if args.rank:
        for run_dir in args.rank:
            emit(held_out_ranking(run_dir, args.frames, args.rank_batch))
        return
    k, latents, batch = args.num_negatives, args.latents, args.batch
    tokens = Pi0Config().prefix_len
    variants = {
        "full": (ENERGY, LossConfig()),
        f"k{k}": (ENERGY, LossConfig(num_negatives=k)),
        f"l{latents}": (dataclasses.replace(ENERGY, context_latents=latents), LossConfig()),
        f"k{k}_l{latents}": (dataclasses.replace(ENERGY, context_latents=latents), LossConfig(num_negatives=k)),
    }
    flops = {name: loss_flops(e, loss, batch, tokens) for name, (e, loss) in variants.items()}
    with unrolled_scans():
        real = real_shape_flops(batch)
    backbone = real["real_backbone_forward_tflops"] * 1e12
    # real_shape_flops's own energy loss (the in-batch InfoNCE without dropout) cross-checks "full"
    result = {
        "benchmark": "energy_cost",
        **machine(),
        "batch": batch,
        "prefix_tokens": tokens,
        "backbone_forward_tflops": round(backbone / 1e12, 2),
        "inbatch_loss_tflops_train_step": round(real["real_energy_loss_grad_tflops"], 4),
        **{f"{name}_loss_gflops": round(f / 1e9, 1) for name, f in flops.items()},
        **{f"{name}_share": round(f / backbone, 5) for name, f in flops.items()},
    }
    print(f"Pi0 prefix forward, b={batch}, {tokens} tokens: {backbone / 1e12:.1f} TFLOP (scans unrolled)")
    print(f"{'loss':>12} {'GFLOP':>9} {'share':>8}")
    for name, f in flops.items():
        print(f"{name:>12} {f / 1e9:>9.1f} {100 * f / backbone:>7.2f}%")
    emit(result)


if __name__ == "__main__":
    main()
