"""openpi checkpoints <-> our Pi0, with no conversion step (reference/openpi.md §1, §3).

A released checkpoint is `<ckpt>/params/` (orbax PyTree, item `{"params": <pure dict>}`) plus
`<ckpt>/assets/<asset_id>/norm_stats.json`. Training checkpoints written by openpi end every leaf path
in an extra `value` key; both layouts load. `openpi_leaves` is the explicit path mapping: each openpi
path (e.g. `PaliGemma/llm/layers/attn/q_einsum/w`) names one array of our module, stacked layer axes
included, so neither loading nor saving reshapes or transposes anything.

Loading fills an `eqx.filter_eval_shape` template (nothing is initialised first) one leaf at a time,
largest first: tensorstore decodes the leaf straight into the requested dtype (its cast driver, as orbax
restores) in one 64-byte-aligned host buffer, which each device of the leaf's sharding takes its shard
from (on a CPU without a copy). So the peak holds the loaded leaves plus one leaf in flight, whose zarr
chunk being decoded also holds its compressed bytes and, if cast, a stored-dtype copy: a whole array
in openpi's layout, at most 64 MiB in `save_openpi_params`' (BENCHMARKS.md). Keys in the checkpoint
that the policy does not have (e.g. an `energy_model` subtree of the seed's fork) are ignored: the
energy head is a sibling of the policy and is initialised or restored separately.
"""

from __future__ import annotations

import itertools
import json
import pathlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jaxtyping import PyTree

# re-exported: reads openpi's norm_stats.json from a file, its folder, or a checkpoint's assets/<asset_id>/
from eqx_energy.data.norm_stats import load_norm_stats as load_norm_stats
from eqx_energy.policy.gemma import AdaRMSNorm
from eqx_energy.policy.pi0 import Pi0, Pi0Config


def _dense(prefix: str, dense) -> dict[str, Any]:
    return {f"{prefix}/kernel": dense.kernel, f"{prefix}/bias": dense.bias}


def _norm(prefix: str, norm) -> dict[str, Any]:
    if isinstance(norm, AdaRMSNorm):
        return {f"{prefix}/Dense_0/kernel": norm.kernel, f"{prefix}/Dense_0/bias": norm.bias}
    return {f"{prefix}/scale": norm.scale}


def _siglip_leaves(img) -> dict[str, Any]:
    out: dict[str, Any] = {
        "PaliGemma/img/embedding/kernel": img.embedding,
        "PaliGemma/img/embedding/bias": img.embedding_bias,
        "PaliGemma/img/pos_embedding": img.pos_embedding,
    }
    enc = "PaliGemma/img/Transformer/encoderblock"
    blk = img.blocks
    out |= {f"{enc}/LayerNorm_0/scale": blk.ln_0.scale, f"{enc}/LayerNorm_0/bias": blk.ln_0.bias}
    out |= {f"{enc}/LayerNorm_1/scale": blk.ln_1.scale, f"{enc}/LayerNorm_1/bias": blk.ln_1.bias}
    mha = f"{enc}/MultiHeadDotProductAttention_0"
    for name in ("query", "key", "value", "out"):
        out[f"{mha}/{name}/kernel"] = getattr(blk.attn, f"{name}_kernel")
        out[f"{mha}/{name}/bias"] = getattr(blk.attn, f"{name}_bias")
    out |= _dense(f"{enc}/MlpBlock_0/Dense_0", blk.mlp_0) | _dense(f"{enc}/MlpBlock_0/Dense_1", blk.mlp_1)
    out |= {
        "PaliGemma/img/Transformer/encoder_norm/scale": img.encoder_norm.scale,
        "PaliGemma/img/Transformer/encoder_norm/bias": img.encoder_norm.bias,
    }
    out |= _dense("PaliGemma/img/head", img.head)
    return out


def openpi_leaves(pi0: Pi0) -> dict[str, Any]:
    """openpi parameter path -> the matching leaf of `pi0` (an array, or a ShapeDtypeStruct in a template).

    A state-only policy (no cameras, `img` None) has no SigLIP paths: a checkpoint's are then ignored."""
    llm = pi0.llm
    out = {} if pi0.img is None else _siglip_leaves(pi0.img)
    out["PaliGemma/llm/embedder/input_embedding"] = llm.embedder
    for i, (layer, final) in enumerate(zip(llm.layers, llm.final_norms)):
        sfx = "" if i == 0 else f"_{i}"
        lay = "PaliGemma/llm/layers"
        out[f"{lay}/attn/q_einsum{sfx}/w"] = layer.q_einsum
        out[f"{lay}/attn/kv_einsum{sfx}/w"] = layer.kv_einsum
        out[f"{lay}/attn/attn_vec_einsum{sfx}/w"] = layer.attn_vec_einsum
        out[f"{lay}/mlp{sfx}/gating_einsum"] = layer.gating_einsum
        out[f"{lay}/mlp{sfx}/linear"] = layer.linear
        out |= _norm(f"{lay}/pre_attention_norm{sfx}", layer.pre_attention_norm)
        out |= _norm(f"{lay}/pre_ffw_norm{sfx}", layer.pre_ffw_norm)
        out |= _norm(f"PaliGemma/llm/final_norm{sfx}", final)
    for name in ("action_in_proj", "action_out_proj", "state_proj", "action_time_mlp_in", "action_time_mlp_out", "time_mlp_in", "time_mlp_out"):
        if getattr(pi0, name) is not None:
            out |= _dense(name, getattr(pi0, name))
    return out


def _getter(pi0: Pi0) -> list[Any]:
    return list(openpi_leaves(pi0).values())


def _nest(flat: dict[str, Any], suffix: tuple[str, ...] = ()) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        parts = path.split("/") + list(suffix)
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    return tree


def _flat_metadata(params_dir: pathlib.Path) -> dict[str, Any]:
    meta = ocp.PyTreeCheckpointer().metadata(params_dir)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError(
            f"{params_dir} is an orbax checkpoint without a top-level 'params' key (got {sorted(tree) if isinstance(tree, dict) else type(tree)}); "
            "pass openpi's <checkpoint>/params directory"
        )
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree["params"])[0]:
        flat["/".join(str(k.key) for k in path)] = leaf
    return flat


def _array_specs(params_dir: pathlib.Path) -> Any:
    """path -> the tensorstore spec of that stored array, as orbax names and lays it out (OCDBT or a folder per array)."""
    meta = json.loads((params_dir / "_METADATA").read_text()) if (params_dir / "_METADATA").exists() else {}
    ocdbt = meta.get("use_ocdbt", (params_dir / "manifest.ocdbt").exists())
    driver = "zarr3" if meta.get("use_zarr3", False) else "zarr"

    def spec(path: str) -> dict[str, Any]:
        name = ".".join(["params", *path.split("/")])
        kvstore = {"driver": "ocdbt", "base": f"file://{params_dir}/", "path": name} if ocdbt else {"driver": "file", "path": str(params_dir / name)}
        return {"driver": driver, "kvstore": kvstore}

    return spec


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    # jax places a 64-byte-aligned numpy array on a CPU device without copying it; numpy aligns to 16
    raw = np.empty(int(np.prod(shape)) * dtype.itemsize + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset : offset + raw.size - 64].view(dtype).reshape(shape)


def _read_leaf(spec: dict[str, Any], dtype: np.dtype, sharding: jax.sharding.Sharding) -> jax.Array:
    """One stored array -> a jax.Array in `dtype` and `sharding`, through one host buffer of the result's size."""
    store = ts.open(spec, open=True, read=True).result()
    if store.dtype.numpy_dtype != dtype:
        store = store.astype(dtype)  # tensorstore casts while decoding: no stored-dtype copy of the whole leaf
    host = _aligned_empty(tuple(store.shape), dtype)
    chunk = store.chunk_layout.read_chunk.shape
    for start in itertools.product(*(range(0, n, c) for n, c in zip(store.shape, chunk))):
        box = tuple(slice(i, i + c) for i, c in zip(start, chunk))  # one chunk at a time: one decoded in flight
        ts.array(host)[box].write(store[box]).result()
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def load_openpi_params(
    params_dir: str | pathlib.Path, config: Pi0Config, *, dtype: str | None = None, shardings: PyTree | None = None
) -> Pi0:
    """Build a `Pi0` for `config` from openpi's `<checkpoint>/params` directory.

    Every leaf the policy needs must be present with the expected shape and a floating dtype; the first
    missing or mismatched path raises a ValueError naming it. `dtype=None` keeps the stored dtype (bf16
    stays bf16); "float32"/"bfloat16" casts while reading. Extra checkpoint keys are ignored.
    `shardings`: a `jax.sharding.Sharding` per array leaf of the `Pi0` (a Pi0-shaped tree, e.g.
    `fsdp_shardings(template, mesh)`); each device then receives only its shard. None: all on device 0.
    """
    params_dir = pathlib.Path(params_dir).absolute()
    if not params_dir.is_dir():
        raise FileNotFoundError(
            f"openpi params directory {params_dir} does not exist; pass <checkpoint>/params of a released openpi "
            "checkpoint (e.g. ~/.cache/openpi/openpi-assets/checkpoints/pi05_libero/params)"
        )
    template = eqx.filter_eval_shape(Pi0, config, key=jax.random.key(0))
    expected = openpi_leaves(template)
    if shardings is None:
        targets = dict.fromkeys(expected, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    else:
        targets = openpi_leaves(shardings)
        bad = next((p for p in expected if not isinstance(targets.get(p), jax.sharding.Sharding)), None)
        if bad is not None:
            raise ValueError(
                f"shardings: no jax.sharding.Sharding for {bad!r} (got {type(targets.get(bad)).__name__}); pass a "
                "Pi0-shaped tree with a Sharding per array leaf, e.g. fsdp_shardings(eqx.filter_eval_shape(Pi0, config, key=...), mesh)"
            )
    stored = _flat_metadata(params_dir)
    value_level = bool(stored) and all(p.endswith("/value") for p in stored)
    if value_level:
        stored = {p[: -len("/value")]: m for p, m in stored.items()}
    for path, want in expected.items():
        if path not in stored:
            raise ValueError(
                f"{params_dir}: parameter {path!r} (shape {want.shape}) is missing; the checkpoint does not match "
                f"config (paligemma={config.paligemma_variant}, expert={config.action_expert_variant}, pi05={config.pi05})"
            )
        got = stored[path]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{params_dir}: parameter {path!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)} for this config")
        if not jnp.issubdtype(jnp.dtype(got.dtype), jnp.floating):
            raise ValueError(f"{params_dir}: parameter {path!r} has dtype {got.dtype}, expected a floating dtype")
    # largest first: while a leaf is in flight, fewer of the others are resident yet
    order = sorted(expected, key=lambda p: -np.prod(expected[p].shape))
    spec, sfx = _array_specs(params_dir), "/value" if value_level else ""
    read = {p: _read_leaf(spec(p + sfx), jnp.dtype(dtype or stored[p].dtype), targets[p]) for p in order}
    return eqx.tree_at(_getter, template, [read[p] for p in expected])


def save_openpi_params(
    pi0: Pi0, params_dir: str | pathlib.Path, *, value_level: bool = False, chunk_bytes: int | None = 64 * 2**20,
    in_flight_gib: int = 1,
) -> pathlib.Path:
    """Write `pi0` as openpi's `<checkpoint>/params` (orbax PyTree `{"params": ...}`, leaves as stored in pi0).

    `value_level=True` writes openpi's training-checkpoint layout (every path ends in `value`). Arrays
    are stored in chunks of at most `chunk_bytes`, so a load decodes (and casts) one chunk at a time;
    None writes one chunk per array, as openpi's saver does (a load then decodes a whole leaf at once).
    At most `in_flight_gib` of arrays are being copied and encoded at once: orbax's default (every
    leaf at once) needs about three times the model's bytes, more than a full-size Pi0 fits in 24 GB.
    """
    params_dir = pathlib.Path(params_dir).absolute()
    tree = {"params": _nest(openpi_leaves(pi0), ("value",) if value_level else ())}
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), tree)
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=in_flight_gib, save_device_host_concurrent_gb=in_flight_gib)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(params_dir, args=ocp.args.PyTreeSave(tree, save_args=save_args))
    return params_dir


def cast_params(pi0: Pi0, dtype: str) -> Pi0:
    """Cast every floating parameter of `pi0` to `dtype` (openpi restores all params as bf16 for inference)."""
    leaves = openpi_leaves(pi0)
    return eqx.tree_at(_getter, pi0, [x.astype(dtype) for x in leaves.values()])


def leaf_table(pi0: Pi0) -> list[tuple[str, tuple[int, ...], str]]:
    """(path, shape, dtype) per openpi leaf, sorted: the format of reference/openpi_pi0_tree.txt."""
    return sorted((p, tuple(int(s) for s in x.shape), str(np.dtype(x.dtype))) for p, x in openpi_leaves(pi0).items())

