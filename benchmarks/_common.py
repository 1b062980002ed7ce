"""Shared helpers for the benchmark scripts: timing, compiled memory and FLOPs, machine facts.

Timing: one warm-up call (compiles), then the median of `repeats` (>= 5) blocked calls.
Memory: XLA's buffer assignment of the compiled function, nothing executed:
    peak ~= argument + output + temp - alias   (bytes; `compiled.memory_analysis()`).
FLOPs: `compiled.cost_analysis()["flops"]` of the same compiled function.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

MIN_REPEATS = 5


def time_call(fn: Callable[[], object], repeats: int = MIN_REPEATS) -> dict[str, float]:
    """Seconds per call of `fn` (no arguments): one warm-up, then median/min of `repeats` runs.

    `fn`'s outputs are blocked on, so asynchronous dispatch is inside the measurement.
    """
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats={repeats}: the benchmarks report a median of >= {MIN_REPEATS} runs")
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "first_call_s": first, "repeats": repeats}


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = MIN_REPEATS) -> dict[str, float]:
    """Median seconds per call of each function, measured side by side: one warm-up call each,
    then `repeats` rounds that call every function once (so load from other processes on a
    shared machine falls on all of them alike)."""
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats={repeats}: the benchmarks report a median of >= {MIN_REPEATS} runs")
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compiled_stats(jitted, *args) -> tuple[jax.stages.Compiled, dict[str, float]]:
    """The compiled `jitted` for `args`, with its peak bytes (argument + output + temp - alias) and FLOPs.

    `jitted` is a `jax.jit`-wrapped function; `args` may be `jax.ShapeDtypeStruct`s, so a function
    too large to run can still be measured. Nothing is executed; call the returned executable
    with arrays of those shapes to run it (no second compilation).
    """
    compiled = jitted.lower(*args).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per device
        cost = cost[0]
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return compiled, {
        "peak_bytes": float(peak),
        "temp_bytes": float(memory.temp_size_in_bytes),
        "argument_bytes": float(memory.argument_size_in_bytes),
        "flops": float(cost.get("flops", 0.0)),
    }


@contextlib.contextmanager
def unrolled_scans():
    """Every `jax.lax.scan` traced inside is unrolled: XLA's cost analysis counts a while-loop body
    once, so with the layer scans rolled it counts one layer of each stack, not all of them."""
    scan = jax.lax.scan
    jax.lax.scan = functools.partial(scan, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = scan


def energy_batch(shape: dict, batch: int, *, action_dim: int, seed: int = 0):
    """Random f32 context (b s c) with a valid prefix of 3/4..all tokens, and actions (b h action_dim)."""
    rng = np.random.default_rng(seed)
    tokens = shape["tokens"]
    context = rng.standard_normal((batch, tokens, shape["context_dim"]), np.float32)
    lengths = rng.integers(3 * tokens // 4, tokens + 1, batch)
    mask = np.arange(tokens)[None, :] < lengths[:, None]
    actions = rng.standard_normal((batch, shape["horizon"], action_dim), np.float32)
    return jnp.asarray(context), jnp.asarray(actions), jnp.asarray(mask)


def policy_batch(cfg, batch: int, rng: np.random.Generator) -> dict:
    """A random Pi0 batch dict (images in [-1, 1], state, full prompt, actions) in openpi's layout."""
    res = cfg.image_resolution
    return {
        "image": {k: rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32) for k in cfg.image_keys},
        "image_mask": {k: np.ones(batch, bool) for k in cfg.image_keys},
        "state": rng.normal(size=(batch, cfg.action_dim)).astype(np.float32),
        "tokenized_prompt": rng.integers(1, cfg.vocab_size, (batch, cfg.max_token_len)).astype(np.int32),
        "tokenized_prompt_mask": np.ones((batch, cfg.max_token_len), bool),
        "actions": rng.normal(size=(batch, cfg.action_horizon, cfg.action_dim)).astype(np.float32),
    }


def shapes_of(tree):
    """The `jax.ShapeDtypeStruct` of every array leaf (for lowering without data)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def machine() -> dict[str, object]:
    """CPU model, core count, jax backend/device and today's date (UTC), for the results table."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def gib(num_bytes: float) -> float:
    return round(num_bytes / 2**30, 3)


def emit(result: dict) -> None:
    """The one JSON line every benchmark ends with."""
    print(json.dumps(result))
