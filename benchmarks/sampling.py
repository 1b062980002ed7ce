"""sample_actions with vs without the KV cache, and the share of a 3-step energy correction in
sample_actions_with_energy_correction, at a reduced Pi0 shape that fits a CPU (issue 3).

Shape: openpi's dummy Gemma experts (width 64, depth 4, 8 heads, head dim 16), a tiny SigLIP at 224 px
(196 tokens per camera), 48 prompt tokens, horizon 50, 10 flow steps, batch 1; energy head hidden 512.
Prints ratios, then one JSON line.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from eqx_energy.energy import EnergyConfig, EnergyModel
from eqx_energy.policy.energy_sampling import sample_actions_with_energy_correction
from eqx_energy.policy.pi0 import Observation, Pi0Config, init_pi0


def _time(fn, repeats=5):
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    cfg = Pi0Config.dummy(siglip_variant="tiny", vocab_size=1024, dtype="float32")
    policy = init_pi0(cfg, key=jax.random.key(0))
    energy = EnergyModel(EnergyConfig(context_dim=cfg.prefix_width, action_dim=7, hidden=512, num_heads=8), key=jax.random.key(1))
    rng = np.random.default_rng(0)
    r, b = cfg.image_resolution, 1
    obs = Observation(
        images={k: jnp.asarray(rng.uniform(-1, 1, (b, r, r, 3)), jnp.float32) for k in cfg.image_keys},
        image_masks={k: jnp.ones((b,), bool) for k in cfg.image_keys},
        state=jnp.zeros((b, 32)),
        tokenized_prompt=jnp.asarray(rng.integers(1, 1024, (b, cfg.max_token_len)), jnp.int32),
        tokenized_prompt_mask=jnp.asarray(np.arange(cfg.max_token_len)[None] < 12),
    )
    key = jax.random.key(2)
    cached = _time(lambda: policy.sample_actions(key, obs, 10))
    uncached = _time(lambda: policy.sample_actions(key, obs, 10, kv_cache=False))
    corrected = _time(lambda: sample_actions_with_energy_correction(policy, energy, key, obs, num_steps=10, energy_correction_steps=3))
    share = max(0.0, corrected - cached) / corrected
    print(f"prefix tokens {cfg.prefix_len}, horizon {cfg.action_horizon}, device {jax.devices()[0].platform}")
    print(f"sample_actions: kv cache {cached * 1e3:.1f} ms, no cache {uncached * 1e3:.1f} ms, speed-up {uncached / cached:.2f}x")
    print(f"with 3-step correction {corrected * 1e3:.1f} ms; correction share {100 * share:.1f}% (target <= 5%)")
    print(json.dumps({"bench": "sampling", "prefix_len": cfg.prefix_len, "cached_ms": cached * 1e3, "uncached_ms": uncached * 1e3,
                      "kv_speedup": uncached / cached, "corrected_ms": corrected * 1e3, "correction_share": share}))


if __name__ == "__main__":
    main()
