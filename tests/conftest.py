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


# The files that keep a worker busiest, longest first (measured: BENCHMARKS.md, "The test suite's time").
# `make test` runs each file on one worker (--dist loadfile, so module fixtures are built once) and hands
# files out in collection order: starting the long ones first lets both workers finish together.
LONGEST_FIRST = (
    "test_train_step.py", "test_losses.py", "test_policy_pi0.py", "test_train_cli.py", "test_correct_cli.py",
    "test_learning.py", "test_train_loop.py", "test_multiprocess.py", "test_precision.py", "test_correct.py",
    "test_load_run.py", "test_serve_policy.py", "test_sim_policy.py", "test_sharding.py", "test_energy.py",
    "test_policy_energy_sampling.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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
