"""k-step energy correction vs one energy forward, and vs a naive loop that re-encodes the context.

  forward:  E_i = E(context_i, actions_i) for the batch, one jitted call (context encoding included);
  correct:  `eqx_energy.correct.correct` with k steps: the context encoded once, then k steps of
            a <- a - clip(alpha dE/da) in `lax.scan` and a final score;
  naive:    the seed's loop: per step one jitted call of dE/da through the *whole* model
            (context projection again every step), the same clipped update on the host side of the loop.
The naive loop's result is checked against `correct`'s. Seed shape (default): S=816, c=2048, h=50,
a=7 (padded to p=32 as the policy emits), hidden 512; b=1 and b=8. Target: 3 steps <= 2x forward.
Medians of >= 5 interleaved rounds after a warm-up. Ends with one JSON line.

Usage: python benchmarks/correction.py [--quick] [--batches 1 8] [--steps 1 3 5]
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp

from _common import energy_batch, emit, machine, time_interleaved
from eqx_energy import CorrectionConfig, EnergyConfig, EnergyModel
from eqx_energy.correct import correct

FULL = {"tokens": 816, "context_dim": 2048, "horizon": 50, "hidden": 512}
QUICK = {"tokens": 64, "context_dim": 256, "horizon": 10, "hidden": 128}
ACTION_DIM = 7
PADDED_DIM = 32


@eqx.filter_jit
def forward(model: EnergyModel, context, actions, context_mask):
    """One energy forward per example (the context projection included)."""
    return jax.vmap(model)(context, actions, context_mask)


@eqx.filter_jit
def naive_step(model: EnergyModel, context, actions, context_mask, config: CorrectionConfig):
    """One seed-style correction step: dE/da through the whole model, context re-projected."""
    grads = jax.vmap(jax.grad(lambda c, a, m: model(c, a, m), argnums=1))(context, actions, context_mask)
    step = config.alpha * grads
    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2)))  # noqa: E731
    limit = jnp.maximum(config.clip_frac * norm(actions), config.clip_floor)
    scale = jnp.minimum(1.0, limit / jnp.maximum(norm(step), 1e-12))
    return actions - scale[:, None, None] * step


def naive_correct(model, context, actions, context_mask, config):
    """The seed's k-step loop on the energy's action dims; the final energy is one more forward."""
    moving = actions[..., :ACTION_DIM]
    for _ in range(config.steps):
        moving = naive_step(model, context, moving, context_mask, config)
    return actions.at[..., :ACTION_DIM].set(moving), forward(model, context, moving, context_mask)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape (seconds)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    config = EnergyConfig(context_dim=shape["context_dim"], action_dim=ACTION_DIM, hidden=shape["hidden"])
    model = eqx.nn.inference_mode(EnergyModel(config, key=jax.random.key(0)))

    results, max_diff = {}, 0.0
    for batch in args.batches:
        context, actions, mask = energy_batch(shape, batch, seed=batch, action_dim=PADDED_DIM)
        fns = {"forward_s": lambda: forward(model, context, actions[..., :ACTION_DIM], mask)}
        for k in args.steps:
            cfg = CorrectionConfig(steps=k)
            ours, trace = correct(model, context, actions, mask, cfg)
            theirs, final_energy = naive_correct(model, context, actions, mask, cfg)
            max_diff = max(max_diff, float(jnp.max(jnp.abs(ours - theirs))),
                           float(jnp.max(jnp.abs(trace.energy[-1] - final_energy))))
            fns[f"correct{k}_s"] = lambda cfg=cfg: correct(model, context, actions, mask, cfg)
            fns[f"naive{k}_s"] = lambda cfg=cfg: naive_correct(model, context, actions, mask, cfg)
        row = time_interleaved(fns, args.repeats)
        results[batch] = row

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']} {info['backend']}, {info['date']}")
    print(f"shape: S={shape['tokens']} c={shape['context_dim']} h={shape['horizon']} a={ACTION_DIM} "
          f"(p={PADDED_DIM}) hidden={shape['hidden']}; max |correct - naive| {max_diff:.1e}")
    print(f"{'b':>3} {'forward ms':>11} " + " ".join(
        f"{'k=' + str(k) + ' ms (x fwd, naive x)':>26}" for k in args.steps))
    ratios = {}
    for batch, row in results.items():
        cells = []
        for k in args.steps:
            over_forward = row[f"correct{k}_s"] / row["forward_s"]
            naive_over = row[f"naive{k}_s"] / row[f"correct{k}_s"]
            ratios[f"b{batch}_k{k}_over_forward"] = round(over_forward, 2)
            ratios[f"b{batch}_k{k}_naive_over_correct"] = round(naive_over, 2)
            cells.append(f"{row[f'correct{k}_s'] * 1e3:>9.1f} ({over_forward:4.2f}x, {naive_over:4.2f}x)")
        print(f"{batch:>3} {row['forward_s'] * 1e3:>11.1f} " + " ".join(f"{c:>26}" for c in cells))
    emit({
        "bench": "correction",
        "quick": args.quick,
        "shape": {**shape, "action_dim": ACTION_DIM, "padded_dim": PADDED_DIM},
        "max_abs_diff_vs_naive": float(f"{max_diff:.2e}"),
        "median_s": {f"b{b}_{name}": round(t, 5) for b, row in results.items() for name, t in row.items()},
        "ratios": ratios,
        "machine": info,
    })


if __name__ == "__main__":
    main()
