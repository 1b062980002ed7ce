"""Cost of the training infrastructure around the model, measured side by side in one run.

1. The always-skip guard: `guarded_update` (finite check + jnp.where over params, optimizer
   state and EMA) vs the same optimizer update + EMA without the guard, jitted, on a tree the size
   of an energy head (~4.5M f32 parameters). Ratio = guarded / plain (median of >= 5 after warm-up).
2. Async checkpointing: how long `RunCheckpoints.save` blocks the loop vs the time until the
   write is on disk (`wait`), for params + Adam state + EMA of that tree.

Ends with one JSON line.
"""

import json
import statistics
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from eqx_energy.checkpoints.run import RunCheckpoints
from eqx_energy.train.config import OptimConfig
from eqx_energy.train.optim import ema_update, group_labels, guarded_update, make_optimizer

REPEATS = 7


def median_time(fn, repeats=REPEATS):
    jax.block_until_ready(fn())  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    keys = jax.random.split(jax.random.key(0), 4)
    # Energy-head-like shapes: projections 2048->512, MLP blocks 512x512, attention 4 x 512x512.
    params = {
        "energy": {
            "context_proj": jax.random.normal(keys[0], (2048, 512)),
            "blocks": jax.random.normal(keys[1], (8, 512, 512)),
            "attn": jax.random.normal(keys[2], (4, 512, 512)),
            "bias": jnp.zeros((512,)),
        }
    }
    n_params = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    opt = make_optimizer(
        OptimConfig(warmup_steps=10), group_labels(params, lambda p: p["energy"]), total_steps=100
    )
    state, ema, skipped, loss = (
        opt.init(params),
        jax.tree.map(jnp.copy, params),
        jnp.int32(0),
        jnp.float32(1.0),
    )

    @eqx.filter_jit
    def plain(params, state, ema):
        updates, state = opt.update(grads, state, params)
        params = eqx.apply_updates(params, updates)
        return params, state, ema_update(ema, params, 0.999)

    @eqx.filter_jit
    def guarded(params, state, ema):
        out = guarded_update(opt, grads, state, params, loss=loss, skipped=skipped, ema=ema, ema_decay=0.999)
        return out.params, out.opt_state, out.ema, out.skipped

    t_plain = median_time(lambda: plain(params, state, ema))
    t_guarded = median_time(lambda: guarded(params, state, ema))
    # Alternate once more so drift on a shared machine hits both.
    t_plain = min(t_plain, median_time(lambda: plain(params, state, ema)))
    t_guarded = min(t_guarded, median_time(lambda: guarded(params, state, ema)))

    save_block, save_total = [], []
    with tempfile.TemporaryDirectory() as run_dir, RunCheckpoints(run_dir, keep=2) as ckpt:
        for step in range(REPEATS):
            start = time.perf_counter()
            ckpt.save(step, params=params, opt_state=state, ema=ema, skipped=skipped, config={"step": step})
            save_block.append(time.perf_counter() - start)
            ckpt.wait()
            save_total.append(time.perf_counter() - start)
    ckpt_mb = 4 * 4 * n_params / 2**20  # params + mu + nu + EMA, f32

    result = {
        "benchmark": "train_infra",
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "params": n_params,
        "update_plain_ms": 1e3 * t_plain,
        "update_guarded_ms": 1e3 * t_guarded,
        "guard_ratio": t_guarded / t_plain,
        "checkpoint_mb": ckpt_mb,
        "save_blocking_ms": 1e3 * statistics.median(save_block[1:]),
        "save_total_ms": 1e3 * statistics.median(save_total[1:]),
    }
    print(
        f"{n_params / 1e6:.2f}M params: update {1e3 * t_plain:.2f} ms plain, "
        f"{1e3 * t_guarded:.2f} ms guarded (ratio {result['guard_ratio']:.3f})"
    )
    print(
        f"checkpoint {ckpt_mb:.0f} MiB: save() blocks {result['save_blocking_ms']:.1f} ms, "
        f"on disk after {result['save_total_ms']:.1f} ms"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
