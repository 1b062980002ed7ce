"""Peak host RSS of `load_openpi_params` on a dummy-size openpi checkpoint, against the tree's bytes.

Writes openpi's `debug` model (`Pi0Config.dummy()`: Gemma width 64, SigLIP So400m/14; 429,337,808
params) with `save_openpi_params` in a subprocess, stored in float32 and in bfloat16, in two layouts:
    openpi   one chunk per array (`chunk_bytes=None`), as openpi's saver writes released checkpoints
    chunked  the writer's default, chunks of at most 64 MiB
Then,
each in a fresh subprocess, loads it and reads the peak RSS (VmHWM of /proc/self/status: Linux keeps
ru_maxrss across fork + exec, so a child would report its parent's):
    f32->f32, f32->bf16, bf16->bf16    stored dtype -> requested dtype
    loader  new: `load_openpi_params` (leaf by leaf, shard by shard, cast while reading)
            old: the restore it did before (one orbax restore of every leaf at once, orbax's cast)
Each child also reports its RSS after imports and a first jax op (the runtime's own share), so
`(peak - base) / tree` is the loader's own cost. The last line printed is JSON.

    python benchmarks/openpi_load_memory.py [--loaders new old] [--workdir DIR]
"""

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine


_SHORT = {"float32": "f32", "bfloat16": "bf16"}


def _rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field + ":")).split()[1])


def _old_load(params_dir: Path, config, dtype: str):
    """The restore `load_openpi_params` did before: every leaf in one orbax call, on device 0."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from eqx_energy.checkpoints.openpi import _flat_metadata, _getter, _nest, openpi_leaves
    from eqx_energy.policy.pi0 import Pi0

    template = eqx.filter_eval_shape(Pi0, config, key=jax.random.key(0))
    expected = openpi_leaves(template)
    stored = _flat_metadata(params_dir)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = {p: jax.ShapeDtypeStruct(tuple(stored[p].shape), jnp.dtype(dtype), sharding=sharding) for p in expected}
    nested = {"params": _nest(item)}
    restored = ocp.PyTreeCheckpointer().restore(
        params_dir,
        args=ocp.args.PyTreeRestore(item=nested, restore_args=ocp.checkpoint_utils.construct_restore_args(nested),
                                    partial_restore=True),
    )["params"]

    def fetch(path: str):
        node = restored
        for part in path.split("/"):
            node = node[part]
        return node

    return eqx.tree_at(_getter, template, [fetch(p) for p in expected])


def _child_load(loader: str, params_dir: str, dtype: str) -> None:
    import jax
    import jax.numpy as jnp

    from eqx_energy.checkpoints.openpi import load_openpi_params
    from eqx_energy.policy.pi0 import Pi0Config

    jnp.zeros(1).block_until_ready()  # the runtime's own memory belongs to the base, not the load
    base = _rss_kib("VmRSS")
    cfg = Pi0Config.dummy()
    load = load_openpi_params if loader == "new" else _old_load
    pi0 = jax.block_until_ready(load(Path(params_dir), cfg, dtype=dtype))
    tree = sum(x.nbytes for x in jax.tree.leaves(pi0))
    print(json.dumps({"base_mib": base / 1024, "peak_mib": _rss_kib("VmHWM") / 1024, "tree_mib": tree / 2**20}))


def _child_write(params_dir: str, dtype: str, layout: str) -> None:
    import jax

    from eqx_energy.checkpoints.openpi import cast_params, save_openpi_params
    from eqx_energy.policy.pi0 import Pi0Config, init_pi0

    pi0 = cast_params(init_pi0(Pi0Config.dummy(), key=jax.random.key(0)), dtype)
    save_openpi_params(pi0, params_dir, **({"chunk_bytes": None} if layout == "openpi" else {}))


def _run(*args: str) -> str:
    return subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loaders", nargs="+", default=["new", "old"], choices=["new", "old"])
    parser.add_argument("--workdir", help="keep the checkpoints here (written only if missing); default: a temporary folder")
    parser.add_argument("--child-write", nargs=3, metavar=("PARAMS_DIR", "DTYPE", "LAYOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-load", nargs=3, metavar=("LOADER", "PARAMS_DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_write:
        _child_write(*args.child_write)
        return
    if args.child_load:
        _child_load(*args.child_load)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("openpi", "chunked"):
            for stored in ("float32", "bfloat16"):
                params_dir = str(Path(args.workdir or tmp) / f"{layout}-{stored}" / "params")
                if not Path(params_dir).exists():
                    _run("--child-write", params_dir, stored, layout)
                targets = ("float32", "bfloat16") if stored == "float32" else ("bfloat16",)
                loaders = args.loaders if layout == "openpi" else ["new"]
                for target, loader in itertools.product(targets, loaders):
                    r = json.loads(_run("--child-load", loader, params_dir, target).strip().splitlines()[-1])
                    name = f"{layout} {_SHORT[stored]}->{_SHORT[target]} {loader}"
                    results[name] = {**r, "peak_over_tree": r["peak_mib"] / r["tree_mib"],
                                     "load_over_tree": (r["peak_mib"] - r["base_mib"]) / r["tree_mib"]}
                    print(name, json.dumps(results[name]), flush=True)
    print(json.dumps({"benchmark": "openpi_load_memory", "results": results, **machine()}))


if __name__ == "__main__":
    main()
