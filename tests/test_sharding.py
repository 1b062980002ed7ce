"""Mesh construction, the FSDP rule, batch sharding, sharded == single-device numerics, and a run's
state created and restored straight into its shardings (per-device bytes bounded throughout)."""

import collections
import functools
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from test_train_loop import tiny_config

from eqx_energy.checkpoints.run import RunCheckpoints
from eqx_energy.train.loop import start_state
from eqx_energy.train.sharding import (
    data_sharding,
    fsdp_shardings,
    init_sharded,
    make_mesh,
    maybe_initialize_distributed,
    replicated,
    shard_batch,
    sharded_shapes,
)


def test_make_mesh_sizes_and_auto_axes():
    assert jax.device_count() == 8
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1}
    assert dict(make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
    mesh = make_mesh(-1, 4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


@pytest.mark.parametrize(("data", "fsdp"), [(3, -1), (-1, 3), (-1, -1), (2, 2), (0, 8)])
def test_make_mesh_rejects_bad_sizes(data, fsdp):
    with pytest.raises(ValueError, match="make_mesh"):
        make_mesh(data, fsdp)


def test_fsdp_rule_specs_and_shards():
    mesh = make_mesh(2, 4)
    tree = {
        "big": jnp.zeros((64, 16), jnp.float32),  # largest axis 64 divides by 4
        "wide": jnp.zeros((6, 32), jnp.float32),  # 6 does not divide: next largest, 32
        "tie": jax.ShapeDtypeStruct((8, 8, 3), jnp.bfloat16),  # ties: the first largest axis
        "odd": jnp.zeros((6, 10), jnp.float32),  # nothing divides by 4: replicated
        "small": jnp.zeros((8, 2), jnp.float32),  # 64 bytes < min_bytes: replicated
        "scalar": jnp.zeros((), jnp.float32),
        "count": jnp.zeros((128,), jnp.int32),  # ints follow the same rule
        "name": "not an array",
    }
    sh = fsdp_shardings(tree, mesh, min_bytes=100)
    specs = {k: (None if v is None else v.spec) for k, v in sh.items()}
    assert specs == {
        "big": P("fsdp", None),
        "wide": P(None, "fsdp"),
        "tie": P("fsdp", None, None),
        "odd": P(),
        "small": P(),
        "scalar": P(),
        "count": P("fsdp"),
        "name": None,
    }
    arrays = {k: v for k, v in tree.items() if isinstance(v, jax.Array)}
    placed = jax.device_put(arrays, {k: sh[k] for k in arrays})
    assert placed["big"].addressable_shards[0].data.shape == (16, 16)
    assert placed["wide"].addressable_shards[0].data.shape == (6, 8)
    assert placed["odd"].addressable_shards[0].data.shape == (6, 10)
    # fsdp size 1: everything replicated whatever its size.
    assert fsdp_shardings({"big": tree["big"]}, make_mesh(8, 1), min_bytes=0)["big"].spec == P()


def test_shard_batch_layout_and_errors():
    mesh = make_mesh(2, 4)
    batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "m": np.ones((16,), bool)}
    out = shard_batch(batch, mesh)
    assert out["x"].sharding == data_sharding(mesh)
    assert out["x"].sharding.spec == P(("data", "fsdp"))
    assert out["x"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    with pytest.raises(ValueError, match=r"shard_batch: leaf \['x'\] has shape \(12, 3\).*multiple of 8"):
        shard_batch({"x": np.zeros((12, 3), np.float32)}, mesh)


class Toy(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, *, key):
        self.mlp = eqx.nn.MLP(12, 1, width_size=64, depth=2, key=key)

    def __call__(self, x):
        return self.mlp(x)[0]


def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def make_step(param_sh, batch_sh):
    @eqx.filter_jit
    def step(model, x, y):
        if param_sh is not None:
            model = eqx.filter_shard(model, param_sh)
            x, y = eqx.filter_shard((x, y), batch_sh)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))
        if param_sh is not None:
            model = eqx.filter_shard(model, param_sh)
        return model, loss

    return step


def test_sharded_step_equals_single_device(key):
    model = Toy(key=key)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 12)).astype(np.float32)
    y = rng.normal(size=(16,)).astype(np.float32)

    single = make_step(None, None)
    ref, ref_losses = model, []
    for _ in range(3):
        ref, loss = single(ref, jnp.asarray(x), jnp.asarray(y))
        ref_losses.append(float(loss))

    mesh = make_mesh(2, 4)
    param_sh = fsdp_shardings(model, mesh, min_bytes=1024)
    sharded = make_step(param_sh, data_sharding(mesh))
    params, static = eqx.partition(model, eqx.is_array)
    par = eqx.combine(jax.device_put(params, eqx.filter(param_sh, lambda s: s is not None)), static)
    losses = []
    for _ in range(3):
        par, loss = sharded(par, *shard_batch((x, y), mesh))
        losses.append(float(loss))

    w = par.mlp.layers[1].weight  # (64, 64), 16 KiB >= min_bytes: split on axis 0 over fsdp
    assert w.sharding.spec == P("fsdp", None) and w.addressable_shards[0].data.shape == (16, 64)
    assert par.mlp.layers[2].bias.sharding.spec == P()
    assert loss.sharding.is_fully_replicated and loss.sharding.mesh == replicated(mesh).mesh
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for a, b in zip(
        jax.tree.leaves(eqx.filter(par, eqx.is_array)),
        jax.tree.leaves(eqx.filter(ref, eqx.is_array)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_no_distributed_env_means_no_initialize(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task Slurm job is not multi-process
    assert maybe_initialize_distributed() is False


def test_initialize_from_coordinator_env():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "1",
        "JAX_PROCESS_ID": "0",
    }
    code = textwrap.dedent(
        """
        import jax
        from jax._src import xla_bridge
        import eqx_energy
        if xla_bridge.backends_are_initialized():
            raise SystemExit("importing eqx_energy computed with JAX (a module-level jnp array)")
        from eqx_energy.train.sharding import maybe_initialize_distributed
        first, second = maybe_initialize_distributed(), maybe_initialize_distributed()
        print(first, second, jax.process_count(), jax.device_count())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "1", "2"]


def test_init_sharded_values_do_not_depend_on_the_mesh():
    """init_sharded computes each device's shards only; the values are bit-equal on a one-device mesh
    and equal a plain eager init up to f32 rounding (XLA fuses the uniform's scale and shift)."""
    mesh = make_mesh(4, 2)
    init = lambda k: Toy(key=k)  # noqa: E731
    model = init_sharded(init, jax.random.key(3), mesh=mesh, min_bytes=1024)
    single = init_sharded(init, jax.random.key(3), mesh=make_mesh(1, 1, devices=jax.devices()[:1]), min_bytes=1024)
    reference = Toy(key=jax.random.key(3))
    specs = fsdp_shardings(eqx.filter(reference, eqx.is_array), mesh, min_bytes=1024)
    arrays = (jax.tree.leaves(eqx.filter(t, eqx.is_array)) for t in (model, single, reference))
    for leaf, one, ref, sharding in zip(*arrays, jax.tree.leaves(specs), strict=True):
        assert leaf.sharding == sharding
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(one))
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), rtol=1e-6, atol=1e-7)
    assert model.mlp.layers[1].weight.sharding.spec == P("fsdp", None)
    templates = sharded_shapes(eqx.filter(reference, eqx.is_array), mesh, min_bytes=1024)
    assert templates.mlp.layers[1].weight == jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=specs.mlp.layers[1].weight)


def _device_bytes() -> collections.Counter:
    """Bytes of live arrays per device: each array's shard size on each device that holds a shard."""
    out = collections.Counter()
    for x in jax.live_arrays():
        try:
            if x.is_deleted():
                continue
            shard, devices = _shard_bytes(x.shape, x.dtype, x.sharding)
        except RuntimeError:  # deleted (donated) by the main thread since live_arrays() listed it
            continue
        for device in devices:
            out[device] += shard
    return out


@functools.cache  # the poller reads every live array each millisecond: keep the per-array work a lookup
def _shard_bytes(shape, dtype, sharding) -> tuple[int, frozenset]:
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return 0, frozenset()
    return int(np.prod(sharding.shard_shape(shape))) * dtype.itemsize, frozenset(sharding.device_set)


class PeakDeviceBytes:
    """Per-device peak of live-array bytes above those live on entry, polled every millisecond from a
    thread while the block runs (the CPU backend has no memory_stats)."""

    def __enter__(self):
        self.base, self.peak = _device_bytes(), collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        for device, n in _device_bytes().items():
            self.peak[device] = max(self.peak[device], n - self.base[device])

    def _poll(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(1e-3)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def _check_layout_and_bound(tree, mesh, peak: PeakDeviceBytes, min_bytes: int) -> int:
    """Every array leaf of `tree` has the FSDP rule's sharding, and no device peaked above its shards
    of `tree` plus one whole leaf (the one in flight). Returns the number of FSDP-sharded leaves."""
    arrays = eqx.filter(tree, eqx.is_array)
    leaves = jax.tree.leaves(arrays)
    for leaf, rule in zip(leaves, jax.tree.leaves(fsdp_shardings(arrays, mesh, min_bytes)), strict=True):
        assert leaf.sharding == rule, (leaf.shape, leaf.dtype, leaf.sharding, rule)
    held = collections.Counter()
    for leaf in leaves:
        for device in leaf.sharding.device_set:
            held[device] += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    bound = max(held.values()) + max(leaf.nbytes for leaf in leaves)
    assert max(peak.peak.values()) <= bound, (sorted(peak.peak.values()), bound)
    return sum(leaf.sharding.spec != P() for leaf in leaves)


def test_run_state_is_created_and_restored_in_its_shardings(tmp_path):
    """A joint run (policy, energy, AdamW moments, EMA) on a (data=4, fsdp=2) mesh: fresh and restored,
    every leaf has the FSDP rule's sharding and no device ever held more than its shards plus one leaf.
    (Building on one device and then placing, as before, peaked at 3.0x that bound on device 0:
    6.98 MB against 2.34 MB.)"""
    min_bytes = 16 * 1024  # the tiny Pi0's wide leaves (16 KiB - 192 KiB) are FSDP-sharded
    cfg = tiny_config(tmp_path, mode="joint")
    mesh = make_mesh(4, 2)
    checkpoints = RunCheckpoints(tmp_path / "run")
    with PeakDeviceBytes() as peak:
        frozen, state, _ = start_state(cfg, mesh, checkpoints, min_bytes=min_bytes)
    assert _check_layout_and_bound((frozen, state), mesh, peak, min_bytes) > 30
    checkpoints.save(2, params=state.params, opt_state=state.opt_state, ema=state.ema, skipped=0, config={})
    checkpoints.wait()
    with PeakDeviceBytes() as peak:
        frozen, restored, _ = start_state(cfg, mesh, checkpoints, min_bytes=min_bytes)
    _check_layout_and_bound((frozen, restored), mesh, peak, min_bytes)
    assert int(restored.step) == 2
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.ema)),
                    jax.tree.leaves((restored.params, restored.opt_state, restored.ema)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    checkpoints.close()
