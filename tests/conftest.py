"""Test-wide setup. Runs before anything imports jax.

Eight fake CPU devices let the sharding tests build a real (data, fsdp) mesh; single-device code
is unaffected (it places arrays on device 0). XLA compiles at -O0: compiling is 60% of the suite's
time, -O0 cuts it by ~40% (the suite: 32 -> 26 min on 2 cores), and every test, the non-finite-skip
and bit-equality ones included, passes at both levels. jaxtyping + beartype checking of every annotated
function in `eqx_energy` is switched on by pytest's `--jaxtyping-packages` option (pyproject.toml).
"""

import fcntl
import os
import shutil
import subprocess
import sys

XLA_TEST_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
# XLA:CPU's legacy fusion emitters compile a tiny train step in 60% of the MLIR emitters' time (the
# new ones build an MLIR context per kernel; a step has ~1000 kernels). An XLA that no longer knows
# the flag aborts on it, so it is probed once in a child process (xdist workers inherit the result).
FAST_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flags: str) -> bool:
    probe = "import jax; jax.devices()"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


if "XLA_FLAGS" not in os.environ:
    fast = f"{XLA_TEST_FLAGS} {FAST_EMITTERS}"
    os.environ["XLA_FLAGS"] = fast if _xla_accepts(fast) else XLA_TEST_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MUJOCO_GL", "egl")
# No persistent compilation cache: with a warm one (jax 0.10.2, CPU) a worker aborted inside a cached
# train step (tests/test_sim_policy.py's run_dir fixture), twice in one run.

import jax  # noqa: E402
import pytest  # noqa: E402
from xdist.scheduler import LoadScopeScheduling  # noqa: E402


# How `make test` splits the suite over its two workers (--dist loadfile, refined here): each unit below
# runs whole on one worker, and units are handed out in this order, longest first, then every other file
# as a unit of its own. Files in a unit share one process's compiled programs (the cached model
# initializer, train step and optimizer, jax's op cache) and the trained tiny run, so a program several
# files need compiles once. Measured per unit: BENCHMARKS.md, "The test suite's time".
WORK_UNITS = (
    # tiny training runs in each mode: the same model initializers and train steps
    ("test_train_loop.py", "test_precision.py", "test_sharding.py", "test_train_cli.py", "test_multiprocess.py",
     "test_sim_policy.py"),
    # the trained tiny run (`tiny_run`), its train step's gradients, and everything that loads or serves it
    ("test_train_step.py", "test_load_run.py", "test_serve_policy.py", "test_correct_cli.py",
     "test_serve_policy_methods.py", "test_serve_cli.py", "test_export_policy.py"),
    # the energy head, its losses and correction at the same tiny shapes
    ("test_losses.py", "test_energy.py", "test_correct.py", "test_select.py"),
    # the tiny Pi0: sampling, guidance, openpi checkpoints
    ("test_policy_pi0.py", "test_policy_energy_sampling.py", "test_checkpoint_openpi.py", "test_policy_ops.py"),
    ("test_learning.py",),
    ("test_sim_evaluate.py",),
)
_POSITION = {name: (i, j) for i, unit in enumerate(WORK_UNITS) for j, name in enumerate(unit)}
_REST = (len(WORK_UNITS), 0)


def work_unit(nodeid: str) -> str:
    """The scope a test runs in: its file's WORK_UNITS entry, else the file alone."""
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return f"unit {_POSITION[name][0]}" if name in _POSITION else name


class WorkUnitScheduling(LoadScopeScheduling):
    """loadfile, with the files of one WORK_UNITS entry as one scope, handed out in collection order."""

    def _split_scope(self, nodeid: str) -> str:
        return work_unit(nodeid)


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    config.option.loadscopereorder = False  # keep WORK_UNITS' order (xdist would sort scopes by test count)
    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: _POSITION.get(item.path.name, _REST))  # stable: the rest keep their order


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id):
    """(run dir, dataset dir) of a tiny Pi0 + energy trained 2 joint steps (tests/tiny_run.py), read-only.

    Trained once per test session: xdist workers share it through a lock in the session's temp root,
    the first to ask builds it and the others wait (training it costs ~80 s on a worker)."""
    from tiny_run import make_tiny_run

    if worker_id == "master":  # no xdist: the base temp dir is this session's own
        return make_tiny_run(tmp_path_factory.mktemp("tiny_run"))
    root = tmp_path_factory.getbasetemp().parent / "tiny_run"  # one per xdist session
    with open(root.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "built"
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # left half-built by a worker that died
            make_tiny_run(root)
            done.touch()
    return root / "run", root / "data"
