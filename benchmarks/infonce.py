"""Factored in-batch InfoNCE vs the seed's naive B² form: time and peak memory of value_and_grad.

Both compute L = CE(clip(-E / tau, ±50), diag) with E_ij = E(context_i, actions_j), differentiated
with respect to every energy parameter:
  factored: `eqx_energy.losses.infonce_inbatch`: b context encodings, b action encodings, b² pair
            scores (optionally `chunk` rows at a time under `jax.checkpoint`);
  naive:    seed 002: b² copies of the context and b² copies of the actions through the whole model.
Seed shape (default): B=32, S=816 context tokens, c=2048, h=50, a=7, hidden 512, 8 heads.

The naive form at B=32 would need far more than this machine's memory, so it is *compiled* at B=32
(XLA's buffer assignment gives its peak without running it) and *timed* at `--naive-batch`; time
is compared as pairs/s (the naive cost is linear in b²), and side by side at the naive batch.
Medians of >= 5 runs after a warm-up. Ends with one JSON line.

Usage: python benchmarks/infonce.py [--quick] [--batch 32] [--naive-batch 4] [--chunk 8] [--time-max-batch B]
"""

from __future__ import annotations

import argparse
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from _common import energy_batch, compiled_stats, emit, gib, machine, shapes_of, time_call
from eqx_energy import EnergyConfig, EnergyModel
from eqx_energy.losses import LOGIT_CLAMP, infonce_inbatch

TAU = 0.5
FULL = {"batch": 32, "naive_batch": 4, "chunk": 8, "tokens": 816, "context_dim": 2048, "horizon": 50, "hidden": 512}
QUICK = {"batch": 8, "naive_batch": 4, "chunk": 4, "tokens": 64, "context_dim": 256, "horizon": 10, "hidden": 128}
ACTION_DIM = 7
MEMORY_BUDGET_GIB = 24.0


def naive_infonce(model: EnergyModel, context, actions, context_mask):
    """Seed 002's form: row i * b + j of the b² batch is (context_i, actions_j), whole model each."""
    b = actions.shape[0]
    contexts = jnp.repeat(context, b, axis=0)
    masks = jnp.repeat(context_mask, b, axis=0)
    chunks = jnp.tile(actions, (b, 1, 1))
    energies = jax.vmap(model)(contexts, chunks, masks).reshape(b, b)
    logits = jnp.clip(-energies / TAU, -LOGIT_CLAMP, LOGIT_CLAMP)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(b)))


def factored_infonce(chunk):
    def loss(model, context, actions, context_mask):
        return infonce_inbatch(model, context, actions, context_mask, tau=TAU, key=None, chunk=chunk)[0]

    return loss


def value_and_grad(loss, static):
    """jit(value_and_grad) of `loss` w.r.t. the model's parameters (the arrays in `params`)."""

    def of_params(params, context, actions, context_mask):
        return loss(eqx.combine(params, static), context, actions, context_mask)

    return jax.jit(jax.value_and_grad(of_params))


def check_equal(functions: dict, params, batch) -> float:
    """Largest difference of loss and gradients from the naive form's, relative to the naive loss
    and to the largest naive gradient entry (some gradients, e.g. of the key bias, are exactly 0)."""
    outputs = {name: fn(params, *batch) for name, fn in functions.items()}
    ref_loss, ref_grads = outputs["naive"]
    grad_scale = max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(ref_grads))
    worst = 0.0
    for loss, grads in outputs.values():
        worst = max(worst, abs(float(loss - ref_loss)) / max(abs(float(ref_loss)), 1e-12))
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            worst = max(worst, float(jnp.max(jnp.abs(g - r))) / grad_scale)
    return worst


def largest_fitting_batch(peak_small: float, small: int, peak_big: float, big: int, budget: float) -> int:
    """Largest b with fixed + per_pair * b² <= budget, from the peaks compiled at two batch sizes."""
    per_pair = (peak_big - peak_small) / (big**2 - small**2)
    fixed = peak_small - per_pair * small**2
    return int(math.floor(math.sqrt(max(budget - fixed, 0.0) / per_pair)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape (seconds)")
    parser.add_argument("--batch", type=int, default=None, help="B of the comparison (seed: 32)")
    parser.add_argument("--naive-batch", type=int, default=None, help="B at which the naive form is timed")
    parser.add_argument("--chunk", type=int, default=None, help="rows per checkpointed chunk (0: skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-max-batch", type=int, default=None,
                        help="only compile (memory, FLOPs), never run, batches above this (slow machines)")
    args = parser.parse_args()
    shape = dict(QUICK if args.quick else FULL)
    batch = args.batch or shape["batch"]
    naive_batch = args.naive_batch or shape["naive_batch"]
    chunk = shape["chunk"] if args.chunk is None else args.chunk
    for name, b in (("--batch", batch), ("--naive-batch", naive_batch)):
        if chunk and b > chunk and b % chunk:
            raise ValueError(f"{name}={b} must be a multiple of --chunk={chunk} (or pass --chunk 0)")

    config = EnergyConfig(context_dim=shape["context_dim"], action_dim=ACTION_DIM, hidden=shape["hidden"])
    model = EnergyModel(config, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    functions = {"factored": value_and_grad(factored_infonce(None), static)}
    if chunk:
        functions[f"factored_chunk{chunk}"] = value_and_grad(factored_infonce(chunk), static)
    functions["naive"] = value_and_grad(naive_infonce, static)

    small = energy_batch(shape, naive_batch, action_dim=ACTION_DIM)
    big = energy_batch(shape, batch, seed=1, action_dim=ACTION_DIM)
    max_rel_diff = check_equal(functions, params, small)

    memory, timing = {}, {}
    for name, fn in functions.items():
        for b, data in ((naive_batch, small), (batch, big)):
            compiled, memory[(name, b)] = compiled_stats(fn, shapes_of(params), *shapes_of(data))
            runnable = name != "naive" or b == naive_batch  # the naive form at B is compiled, never run
            if runnable and (args.time_max_batch is None or b <= args.time_max_batch):
                run = lambda compiled=compiled, data=data: compiled(params, *data)  # noqa: E731
                timing[(name, b)] = time_call(run, args.repeats)["median_s"]

    pairs_per_s = {k: k[1] ** 2 / t for k, t in timing.items()}
    naive_fits = largest_fitting_batch(
        memory[("naive", naive_batch)]["peak_bytes"], naive_batch,
        memory[("naive", batch)]["peak_bytes"], batch, MEMORY_BUDGET_GIB * 2**30,
    )
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']} {info['backend']}, {info['date']}")
    print(f"shape: B={batch} S={shape['tokens']} c={shape['context_dim']} h={shape['horizon']} a={ACTION_DIM} "
          f"hidden={shape['hidden']}; naive timed at B={naive_batch}; max rel. diff vs naive {max_rel_diff:.1e}")
    print(f"{'variant':>18} {'B':>4} {'peak GiB':>9} {'GFLOP':>9} {'median s':>9} {'pairs/s':>9}")
    for (name, b), stats in memory.items():
        t = timing.get((name, b))
        print(f"{name:>18} {b:>4} {gib(stats['peak_bytes']):>9.3f} {stats['flops'] / 1e9:>9.1f} "
              + (f"{t:>9.3f} {b * b / t:>9.1f}" if t else f"{'-':>9} {'-':>9}"))

    result = {
        "bench": "infonce",
        "quick": args.quick,
        "shape": {"batch": batch, "naive_batch": naive_batch, "tokens": shape["tokens"],
                  "context_dim": shape["context_dim"], "horizon": shape["horizon"], "action_dim": ACTION_DIM,
                  "hidden": shape["hidden"], "chunk": chunk or None},
        "max_rel_diff_vs_naive": float(f"{max_rel_diff:.2e}"),
        "naive_largest_batch_in_24gib": naive_fits,
        "peak_gib": {f"{n}_b{b}": gib(s["peak_bytes"]) for (n, b), s in memory.items()},
        "gflop": {f"{n}_b{b}": round(s["flops"] / 1e9, 2) for (n, b), s in memory.items()},
        "median_s": {f"{n}_b{b}": round(t, 4) for (n, b), t in timing.items()},
        "pairs_per_s": {f"{n}_b{b}": round(r, 2) for (n, b), r in pairs_per_s.items()},
        "speedup_same_batch": round(timing[("naive", naive_batch)] / timing[("factored", naive_batch)], 2),
        "flop_ratio": round(memory[("naive", batch)]["flops"] / memory[("factored", batch)]["flops"], 2),
        # Memory: both compiled at B (XLA buffer assignment), naive / factored.
        "memory_ratio": round(memory[("naive", batch)]["peak_bytes"] / memory[("factored", batch)]["peak_bytes"], 2),
        "machine": info,
    }
    if chunk:
        chunked = f"factored_chunk{chunk}"
        result["memory_ratio_chunk"] = round(
            memory[("naive", batch)]["peak_bytes"] / memory[(chunked, batch)]["peak_bytes"], 2)
    # Time: per-pair rate of the factored form at B vs the naive form at the largest B it was run.
    for name in [n for n in functions if n != "naive"]:
        if (name, batch) in pairs_per_s:
            suffix = name.removeprefix("factored")
            result[f"speedup_per_pair{suffix}"] = round(
                pairs_per_s[(name, batch)] / pairs_per_s[("naive", naive_batch)], 2)
    speedup = f"{result['speedup_per_pair']}x" if "speedup_per_pair" in result else "not timed"
    print(f"per-pair speed-up at B={batch} {speedup} "
          f"(same-batch B={naive_batch} {result['speedup_same_batch']}x, "
          f"FLOP ratio {result['flop_ratio']}x); memory ratio {result['memory_ratio']}x"
          + (f", with chunk {result['memory_ratio_chunk']}x" if chunk else "")
          + f"; naive fits 24 GiB up to B={naive_fits}")
    emit(result)


if __name__ == "__main__":
    main()
