"""Mesh construction, the FSDP rule, batch sharding, and sharded == single-device numerics."""

import os
import socket
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from eqx_energy.train.sharding import (
    data_sharding,
    fsdp_shardings,
    make_mesh,
    maybe_initialize_distributed,
    replicated,
    shard_batch,
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
