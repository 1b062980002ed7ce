"""The one place that names mesh axes: a (data, fsdp) mesh, FSDP parameter shardings, batch sharding.

Parameters: an array of at least `min_bytes` is split over "fsdp" on its largest axis divisible
by the fsdp size; smaller or indivisible arrays are replicated. Batches: the leading axis is split
over all devices, ("data", "fsdp"), since FSDP devices also take different examples (as openpi).
Model code never names an axis; it stays sharding-agnostic and the compiler propagates layouts.

Arrays are created where they live: `init_sharded` evaluates an initializer's shapes, gives each
leaf its FSDP sharding, and runs the initializer under one jit with those `out_shardings`, so each
device computes only its own shard; `sharded_shapes` gives the same shardings as restore templates.
No device ever holds a whole sharded leaf.

Multi-host: call `maybe_initialize_distributed()` first thing in the program (before any JAX
computation). It runs `jax.distributed.initialize()` when one of these says a job spans processes:
  - JAX_COORDINATOR_ADDRESS (host:port of process 0), with JAX_NUM_PROCESSES and JAX_PROCESS_ID
    (any cluster; JAX reads the address itself, we pass the two counts);
  - SLURM_STEP_NUM_TASKS > 1 (inside `srun`; JAX reads the Slurm variables itself and gives each
    task one device, number SLURM_LOCALID, unless JAX_LOCAL_DEVICE_IDS lists them);
  - OMPI_COMM_WORLD_SIZE > 1 (mpirun from Open MPI; JAX reads its variables itself).
Process i then feeds rows [i b, (i+1) b) of every global batch to `shard_batch` (make_pipeline
reads just those), so a step sees the same examples in the same order on any number of processes.
The processes share one run dir (orbax needs a shared filesystem); `process_zero_first` lets
process 0 alone create files there.
"""

import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

logger = logging.getLogger(__name__)

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)
FSDP_MIN_BYTES = 4 * 2**20  # smaller parameters are replicated (openpi's min_size_mbytes=4)


def make_mesh(data: int = -1, fsdp: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (None: all) with Auto axis types; -1 = the devices left over.

    Auto, not jax's default Explicit: Explicit axes break `eqx.filter_shard` and unannotated
    matmuls between FSDP-sharded weights and data-sharded activations.
    """
    n = jax.device_count() if devices is None else len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("make_mesh: at most one of data and fsdp may be -1, got both; give fsdp a size")
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if data <= 0 or fsdp <= 0 or data * fsdp != n:
        raise ValueError(
            f"make_mesh: data x fsdp must equal the {n} devices, got data={data}, fsdp={fsdp}; "
            f"pick sizes whose product is {n}, or -1 for one of them"
        )
    return jax.make_mesh((data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def fsdp_spec(shape: tuple[int, ...], itemsize: int, fsdp_size: int, min_bytes: int) -> P:
    """P with "fsdp" on the largest axis divisible by `fsdp_size`, or P() (replicated)."""
    if fsdp_size == 1 or len(shape) == 0 or int(np.prod(shape)) * itemsize < min_bytes:
        return P()
    for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[axis] % fsdp_size == 0:
            spec: list[str | None] = [None] * len(shape)
            spec[axis] = FSDP
            return P(*spec)
    return P()


def fsdp_shardings(tree: PyTree, mesh: Mesh, min_bytes: int = FSDP_MIN_BYTES) -> PyTree:
    """NamedSharding per array leaf of `tree` (arrays or ShapeDtypeStructs); None elsewhere.

    Leaves of at least `min_bytes` are FSDP-sharded by `fsdp_spec`; each decision is logged.
    The result fits `jax.device_put`, `eqx.filter_shard` and `jax.ShapeDtypeStruct(sharding=)`.
    """
    fsdp_size = mesh.shape[FSDP]

    def one(path, leaf):
        if not (eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)):
            return None
        spec = fsdp_spec(tuple(leaf.shape), np.dtype(leaf.dtype).itemsize, fsdp_size, min_bytes)
        logger.info(
            "sharding %s %s %s -> %s", jax.tree_util.keystr(path), leaf.dtype, tuple(leaf.shape), spec
        )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def _is_shape(x: object) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def sharded_shapes(tree: PyTree, mesh: Mesh, min_bytes: int = FSDP_MIN_BYTES) -> PyTree:
    """Array and ShapeDtypeStruct leaves -> ShapeDtypeStructs carrying their `fsdp_shardings`
    sharding (restore templates, `init_sharded`'s outputs); other leaves unchanged."""
    shardings = fsdp_shardings(tree, mesh, min_bytes)
    return jax.tree.map(
        lambda x, s: x if s is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        tree, shardings, is_leaf=lambda x: x is None,
    )


def init_sharded(
    init: Callable[..., PyTree], *args: PyTree, mesh: Mesh, min_bytes: int = FSDP_MIN_BYTES, donate: bool = False
) -> PyTree:
    """`init(*args)` with every array created straight into its `fsdp_shardings` sharding.

    The shapes come from `eqx.filter_eval_shape`; one jit with those `out_shardings` then computes
    each device's shards only (random keys are partitionable, so values do not depend on the mesh).
    `args` are array pytrees; `donate` hands their buffers to the outputs (e.g. params moved into a
    train state). Compiled without optimisation: an init is run once, and an optimised compile of a
    large model costs ~10x the init itself on a CPU.
    """
    return sharded_initializer(init, *args, mesh=mesh, min_bytes=min_bytes, donate=donate)(*args)


def sharded_initializer(
    init: Callable[..., PyTree], *examples: PyTree, mesh: Mesh, min_bytes: int = FSDP_MIN_BYTES, donate: bool = False
) -> Callable[..., PyTree]:
    """`init_sharded`'s compiled program, for arguments shaped and placed like `examples`: call it
    on such arguments as often as needed (one compile)."""
    shapes, static = eqx.partition(eqx.filter_eval_shape(init, *examples), _is_shape)
    out_shardings = fsdp_shardings(shapes, mesh, min_bytes)
    arrays = lambda *a: eqx.filter(init(*a), eqx.is_array)  # noqa: E731
    jitted = jax.jit(arrays, out_shardings=out_shardings, donate_argnums=tuple(range(len(examples))) if donate else ())
    compiled = jitted.lower(*examples).compile(
        compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    )
    return lambda *args: eqx.combine(compiled(*args), static)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, small state, metrics)."""
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays: leading axis split over all devices ("data" then "fsdp"), the rest whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """This process's rows of the global batch (numpy or jax leaves) -> global arrays on `mesh`.

    Process i of n passes rows [i b, (i+1) b) of a global batch of n b rows (with one process,
    the whole batch), which its devices must hold under `data_sharding`: true of `make_mesh`,
    whose device order is process-major. The global batch must divide by the number of devices.
    """
    sharding = data_sharding(mesh)
    n = mesh.size
    local = jax.process_count()

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or (x.shape[0] * local) % n:
            raise ValueError(
                f"shard_batch: leaf {jax.tree_util.keystr(path)} has shape {x.shape}; its leading (batch) "
                f"axis times {local} process(es) must divide by the {n} devices of the mesh; "
                f"change data.batch_size to a multiple of {n}"
            )
        _check_process_rows(sharding, x.shape[0], local)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(one, batch)


def _check_process_rows(sharding: NamedSharding, rows: int, processes: int) -> None:
    """Raise unless this process's devices hold rows [i rows, (i+1) rows) of the global batch."""
    if processes == 1:
        return
    index = jax.process_index()
    held = {
        row
        for slices in sharding.addressable_devices_indices_map((rows * processes,)).values()
        for row in range(*slices[0].indices(rows * processes))
    }
    if held != set(range(index * rows, (index + 1) * rows)):
        raise ValueError(
            f"shard_batch: process {index}'s devices hold rows {sorted(held)} of the global batch, but it "
            f"passes rows {index * rows}..{(index + 1) * rows - 1} (its data pipeline's shard); build the mesh "
            "with make_mesh, whose device order is process-major"
        )


T = TypeVar("T")


def process_zero_first(fn: Callable[[], T], name: str) -> T:
    """`fn()` on process 0 and, once it has returned there, on the others (a barrier named `name`).

    For files in the run dir that all processes share: process 0 creates them, the others read
    what it wrote instead of racing to write the same files. With one process, just `fn()`.
    """
    if jax.process_count() == 1:
        return fn()
    first = jax.process_index() == 0
    out = fn() if first else None
    multihost_utils.sync_global_devices(name)
    return out if first else fn()


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` if the environment describes a multi-process job (module doc).

    Returns whether it initialized. Call before any other JAX computation; later calls are no-ops.
    Slurm counts as multi-process inside a multi-task `srun` step only: a batch script's own
    `python` (SLURM_NTASKS may be > 1 there too) is one process and must not wait for others.
    """
    env = os.environ
    cluster = int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    multi = cluster or "JAX_COORDINATOR_ADDRESS" in env
    if not multi or jax.distributed.is_initialized():
        return False
    names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    counts = {arg: int(env[var]) for arg, var in names.items() if var in env}
    if not cluster and len(counts) < 2:
        raise ValueError(
            f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']} makes this a multi-process job, but "
            f"{' and '.join(v for v in names.values() if v not in env)} is not set; set JAX_NUM_PROCESSES=N and "
            "JAX_PROCESS_ID=0..N-1 on every host (or unset JAX_COORDINATOR_ADDRESS for one process)"
        )
    jax.distributed.initialize(**counts)
    logger.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
