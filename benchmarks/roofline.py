"""Achieved FLOP/s of the energy head's forward+backward vs this machine's f32 matmul peak.

  peak:      a large f32 `jnp.dot` (n x n @ n x n, 2 n³ FLOPs), timed in the same run;
  energy:    value_and_grad w.r.t. the parameters of mean_i E(context_i, actions_i) for b examples;
  infonce:   value_and_grad of the factored in-batch InfoNCE (b contexts x b action chunks).
FLOPs of each workload come from XLA's `cost_analysis()` of the compiled function; the achieved
rate is FLOPs / median seconds. All three are timed side by side (interleaved rounds), so other
load on a shared machine falls on peak and workload alike. Target: >= 50% of peak.
Seed shape (default): S=816, c=2048, h=50, a=7, hidden 512, b=8. Ends with one JSON line.

Usage: python benchmarks/roofline.py [--quick] [--batch 8] [--matmul 2048]
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from _common import compiled_stats, emit, machine, shapes_of, time_interleaved
from eqx_energy import EnergyConfig, EnergyModel
from eqx_energy.losses import infonce_inbatch

FULL = {"batch": 8, "matmul": 2048, "tokens": 816, "context_dim": 2048, "horizon": 50, "hidden": 512}
QUICK = {"batch": 4, "matmul": 1024, "tokens": 64, "context_dim": 256, "horizon": 10, "hidden": 128}
ACTION_DIM = 7


def energy_loss(model: EnergyModel, context, actions, context_mask):
    """mean_i E(c_i, a_i): one energy forward per example."""
    return jnp.mean(jax.vmap(model)(context, actions, context_mask))


def infonce_loss(model: EnergyModel, context, actions, context_mask):
    return infonce_inbatch(model, context, actions, context_mask, tau=0.5, key=None)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape (seconds)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--matmul", type=int, default=None, help="n of the n x n peak matmul")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = dict(QUICK if args.quick else FULL)
    batch = args.batch or shape["batch"]
    n = args.matmul or shape["matmul"]

    config = EnergyConfig(context_dim=shape["context_dim"], action_dim=ACTION_DIM, hidden=shape["hidden"])
    params, static = eqx.partition(EnergyModel(config, key=jax.random.key(0)), eqx.is_inexact_array)
    rng = np.random.default_rng(0)
    tokens = shape["tokens"]
    data = (
        jnp.asarray(rng.standard_normal((batch, tokens, shape["context_dim"]), np.float32)),
        jnp.asarray(rng.standard_normal((batch, shape["horizon"], ACTION_DIM), np.float32)),
        jnp.asarray(np.arange(tokens)[None, :] < rng.integers(3 * tokens // 4, tokens + 1, batch)[:, None]),
    )
    x, y = (jnp.asarray(rng.standard_normal((n, n), np.float32)) for _ in range(2))

    compiled, flops = {}, {}
    compiled["matmul"], stats = compiled_stats(jax.jit(jnp.dot), x, y)
    flops["matmul"] = 2.0 * n**3  # the definition of the peak; cost_analysis agrees (checked below)
    matmul_cost_flops = stats["flops"]
    for name, loss in (("energy", energy_loss), ("infonce", infonce_loss)):
        of_params = lambda p, *d, loss=loss: loss(eqx.combine(p, static), *d)  # noqa: E731
        compiled[name], stats = compiled_stats(jax.jit(jax.value_and_grad(of_params)), params, *shapes_of(data))
        flops[name] = stats["flops"]

    times = time_interleaved({
        "matmul": lambda: compiled["matmul"](x, y),
        "energy": lambda: compiled["energy"](params, *data),
        "infonce": lambda: compiled["infonce"](params, *data),
    }, args.repeats)
    rate = {name: flops[name] / t for name, t in times.items()}
    fraction = {name: rate[name] / rate["matmul"] for name in ("energy", "infonce")}

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']} {info['backend']}, {info['date']}")
    print(f"shape: b={batch} S={tokens} c={shape['context_dim']} h={shape['horizon']} a={ACTION_DIM} "
          f"hidden={shape['hidden']}; peak from {n}x{n} f32 matmul "
          f"(cost_analysis {matmul_cost_flops / 1e9:.2f} GFLOP, 2n³ {flops['matmul'] / 1e9:.2f})")
    print(f"{'workload':>10} {'GFLOP':>9} {'median s':>9} {'GFLOP/s':>9} {'of peak':>8}")
    for name in ("matmul", "energy", "infonce"):
        share = fraction.get(name, 1.0)
        print(f"{name:>10} {flops[name] / 1e9:>9.2f} {times[name]:>9.4f} {rate[name] / 1e9:>9.1f} {share:>8.1%}")
    emit({
        "bench": "roofline",
        "quick": args.quick,
        "shape": {"batch": batch, "tokens": tokens, "context_dim": shape["context_dim"],
                  "horizon": shape["horizon"], "action_dim": ACTION_DIM, "hidden": shape["hidden"], "matmul_n": n},
        "gflop": {k: round(v / 1e9, 3) for k, v in flops.items()},
        "median_s": {k: round(v, 5) for k, v in times.items()},
        "gflop_per_s": {k: round(v / 1e9, 2) for k, v in rate.items()},
        "fraction_of_peak": {k: round(v, 3) for k, v in fraction.items()},
        "machine": info,
    })


if __name__ == "__main__":
    main()
