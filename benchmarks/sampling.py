"""Cost of energy-guided inference (issues 3 and 12): n candidates + their scoring vs one plain sample.

1. FLOPs at the real Pi0 shape from XLA's cost analysis, nothing executed: openpi's Pi0 (gemma_2b +
   gemma_300m, SigLIP So400m, 3 x 224 px, 48 prompt tokens -> 816 prefix tokens, bf16, horizon 50),
   batch 1, energy head hidden 512 on 7 action dims. XLA's cost analysis counts a while-loop body
   once, so every layer scan is unrolled while these pieces are lowered, and the flow loop is added up
   by hand: plain = prefix + steps * velocity(1 chunk); best-of-n = prefix + steps * velocity(n
   chunks, one KV cache) + scoring of the n chunks (context encoded once).
   Target (issue 12): best-of-8 <= 2.5x plain.
2. Measured time at the metaworld_energy shape (configs/metaworld_energy.yaml: state-only tiny Pi0, 72
   prompt tokens, horizon 10, 10 flow steps) for a batch of 50 envs: plain sample, n candidates +
   `select`, and guided sampling; interleaved repeats, median seconds.
3. With `--kv-cache`: the issue-3 check at a CPU-sized shape, sample_actions with vs without the KV
   cache and the share of a 3-step correction.

    python benchmarks/sampling.py [--skip-real] [--num-samples 8] [--batch 50] [--kv-cache]
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from _common import compiled_stats, emit, machine, policy_batch, time_interleaved, unrolled_scans
from eqx_energy.energy import EnergyConfig, EnergyModel
from eqx_energy.policy.energy_sampling import GuidanceConfig, guided_sample, sample_actions_with_energy_correction
from eqx_energy.policy.pi0 import Observation, Pi0, Pi0Config, init_pi0
from eqx_energy.select import score_candidates, select
from eqx_energy.train.config import TrainConfig, load_config

NUM_STEPS = 10


def real_shape_flops(num_samples: int) -> dict:
    """FLOPs of the pieces of plain and best-of-n sampling at the real Pi0 shape (compiled, not run)."""
    cfg = Pi0Config()
    is_leaf = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    params, static = eqx.partition(eqx.filter_eval_shape(Pi0, cfg, key=jax.random.key(0)), is_leaf)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    obs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), policy_batch(cfg, 1, np.random.default_rng(0)))
    h, p, ad = cfg.action_horizon, cfg.action_dim, 7
    prefix = eqx.filter_eval_shape(lambda pr, o: eqx.combine(pr, static).prefill(Observation.from_dict(o)), params, obs)

    def prefill(pr, o):
        return eqx.combine(pr, static).prefill(Observation.from_dict(o))

    def velocity(pr, prefix, state, x):
        return eqx.combine(pr, static).velocity(prefix, state, x, jnp.float32(0.5))

    energy_cfg = EnergyConfig(context_dim=cfg.prefix_width, action_dim=ad, hidden=512, num_heads=8)
    e_params, e_static = eqx.partition(eqx.filter_eval_shape(EnergyModel, energy_cfg, key=jax.random.key(0)), is_leaf)

    def scoring(ep, context, mask, candidates):
        energy = eqx.combine(ep, e_static)
        return score_candidates(energy, jax.vmap(energy.encode_context)(context, mask), candidates)

    state = jax.ShapeDtypeStruct((1, p), jnp.float32)
    with unrolled_scans():
        flops = {"prefix": compiled_stats(jax.jit(prefill), params, obs)[1]["flops"]}
        for n in (1, num_samples):
            x = jax.ShapeDtypeStruct((1, h, p) if n == 1 else (1, n, h, p), jnp.float32)
            flops[f"velocity_n{n}"] = compiled_stats(jax.jit(velocity), params, prefix, state, x)[1]["flops"]
    candidates = jax.ShapeDtypeStruct((1, num_samples, h, ad), jnp.float32)
    flops["scoring"] = compiled_stats(jax.jit(scoring), e_params, prefix.features, prefix.mask, candidates)[1]["flops"]
    plain = flops["prefix"] + NUM_STEPS * flops["velocity_n1"]
    best_of_n = flops["prefix"] + NUM_STEPS * flops[f"velocity_n{num_samples}"] + flops["scoring"]
    return {
        "real_prefix_tokens": cfg.prefix_len,
        **{f"real_{k}_gflops": v / 1e9 for k, v in flops.items()},
        "real_plain_gflops": plain / 1e9,
        f"real_best_of_{num_samples}_gflops": best_of_n / 1e9,
        f"real_best_of_{num_samples}_vs_plain_flops": best_of_n / plain,
    }


def metaworld_times(num_samples: int, batch: int, repeats: int) -> dict:
    """Median seconds at the metaworld_energy shape: plain, n candidates + select, guided (n = 1)."""
    cfg = load_config(TrainConfig, "metaworld_energy", overrides=["data.root=unused"])
    policy = init_pi0(cfg.policy.model, key=jax.random.key(0))
    energy = EnergyModel(cfg.energy, key=jax.random.key(1))
    obs = Observation.from_dict(jax.tree.map(jnp.asarray, policy_batch(cfg.policy.model, batch, np.random.default_rng(0))))
    key = jax.random.key(2)

    def best_of_n():
        candidates, context, mask = policy.sample_actions(key, obs, NUM_STEPS, num_samples=num_samples)
        return select(energy, context, candidates, mask)[0]

    times = time_interleaved({
        "plain": lambda: policy.sample_actions(key, obs, NUM_STEPS)[0],
        f"best_of_{num_samples}": best_of_n,
        "guided": lambda: guided_sample(policy, energy, key, obs, NUM_STEPS, GuidanceConfig(scale=0.1))[0],
    }, repeats=repeats)
    return {
        "metaworld_shape": f"state-only tiny Pi0, prefix {cfg.policy.model.prefix_len}, h={cfg.policy.model.action_horizon}, "
        f"b={batch}, {NUM_STEPS} flow steps",
        **{f"metaworld_{k}_ms": v * 1e3 for k, v in times.items()},
        f"metaworld_best_of_{num_samples}_vs_plain_time": times[f"best_of_{num_samples}"] / times["plain"],
        "metaworld_guided_vs_plain_time": times["guided"] / times["plain"],
    }


def kv_cache_check(repeats: int) -> dict:
    """Issue 3 at openpi's dummy Gemma + tiny SigLIP (224 px, 3 cameras), batch 1: KV cache speed-up and the
    share of a 3-step correction."""
    cfg = Pi0Config.dummy(siglip_variant="tiny", vocab_size=1024, dtype="float32")
    policy = init_pi0(cfg, key=jax.random.key(0))
    energy = EnergyModel(EnergyConfig(context_dim=cfg.prefix_width, action_dim=7, hidden=512, num_heads=8), key=jax.random.key(1))
    obs = Observation.from_dict(jax.tree.map(jnp.asarray, policy_batch(cfg, 1, np.random.default_rng(0))))
    key = jax.random.key(2)
    times = time_interleaved({
        "cached": lambda: policy.sample_actions(key, obs, NUM_STEPS)[0],
        "uncached": lambda: policy.sample_actions(key, obs, NUM_STEPS, kv_cache=False)[0],
        "corrected": lambda: sample_actions_with_energy_correction(policy, energy, key, obs, num_steps=NUM_STEPS,
                                                                   energy_correction_steps=3)[0],
    }, repeats=repeats)
    return {"kv_prefix_tokens": cfg.prefix_len, **{f"kv_{k}_ms": v * 1e3 for k, v in times.items()},
            "kv_speedup": times["uncached"] / times["cached"],
            "correction_share": max(0.0, times["corrected"] - times["cached"]) / times["corrected"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=50, help="envs per policy call at the metaworld shape")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-real", action="store_true", help="skip compiling the real-size Pi0 pieces (minutes)")
    parser.add_argument("--kv-cache", action="store_true", help="also the issue-3 KV-cache check")
    args = parser.parse_args()
    result = {"benchmark": "sampling", **machine()}
    if not args.skip_real:
        result.update(real_shape_flops(args.num_samples))
    result.update(metaworld_times(args.num_samples, args.batch, args.repeats))
    if args.kv_cache:
        result.update(kv_cache_check(args.repeats))
    for k, v in result.items():
        print(f"{k:>40}: {v:.4g}" if isinstance(v, float) else f"{k:>40}: {v}")
    emit(result)


if __name__ == "__main__":
    main()
