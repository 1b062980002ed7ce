"""Multi-process training for real: two local processes joined by `jax.distributed` over loopback
(gloo CPU collectives, 4 fake CPU devices each) run `train.py` exactly as on two hosts, and train the
tiny config on a (data=4, fsdp=2) mesh. One process with the same 8 devices is the reference: its
losses, and its final parameters, optimizer state and EMA, must come out the same, the two-process
checkpoint must restore in that one process, and only process 0 may write the run's files.
"""

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_run import tiny_config, tiny_dataset

from eqx_energy.checkpoints.run import RunCheckpoints, abstract
from eqx_energy.train.config import write_config
from eqx_energy.train.loop import run as train_run
from eqx_energy.train.loop import start_state
from eqx_energy.train.metrics import read_metrics
from eqx_energy.train.sharding import make_mesh, maybe_initialize_distributed
from eqx_energy.train.step import TrainState

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
STEPS = 3
TIMING_KEYS = ("time", "steps_per_s", "data_wait_s", "data_wait_frac")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: Path, run_dir: Path, port: int, process_id: int) -> subprocess.Popen:
    """`python train.py` as process `process_id` of a job whose coordinator is 127.0.0.1:`port`."""
    # the suite's compile flags (conftest.py), with 4 fake devices in place of 8
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, "--xla_force_host_platform_device_count=4"]),
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",  # cross-process collectives on CPU
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(PROCESSES),
        "JAX_PROCESS_ID": str(process_id),
    }
    command = [sys.executable, "train.py", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_state(cfg, run_dir: Path) -> TrainState:
    """The one-process run's latest train state, restored here (8 devices) onto the (4, 2) mesh."""
    with RunCheckpoints(run_dir) as checkpoints:
        assert checkpoints.latest_step == STEPS
        return start_state(cfg, make_mesh(4, 2), checkpoints)[1]


@pytest.mark.slow
def test_two_processes_train_as_one_process(tmp_path):
    # energy_only: the joint step compiles ~2.5x longer (joint metrics matched as well, to 3e-7).
    # Adam's step m / (sqrt(v) + eps) is ~lr sign(g) wherever |g| >> eps: with eps 1e-8, gradient entries
    # near 0, summed in another order across processes, flip sign and move a parameter by ~lr (measured:
    # up to 2e-4 apart after 3 steps, losses still equal to 2e-7); eps 1e-3 keeps the step smooth in g.
    cfg = tiny_config(tiny_dataset(tmp_path / "data"), mode="energy_only", steps=STEPS, checkpoint_interval=STEPS,
                      mesh=[4, 2])
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, eps=1e-3))
    write_config(cfg, tmp_path / "config.yaml")
    port = _free_port()
    procs = [_launch(tmp_path / "config.yaml", tmp_path / "two", port, i) for i in range(PROCESSES)]
    try:
        train_run(cfg, tmp_path / "one", progress=False)  # meanwhile here: one process, 8 devices
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"

    one, two = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # one line a step: process 0 alone writes
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - set(TIMING_KEYS):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']}: {key}")
    assert {p.name for p in (tmp_path / "two").iterdir()} == {p.name for p in (tmp_path / "one").iterdir()}

    reference = _final_state(cfg, tmp_path / "one")
    with RunCheckpoints(tmp_path / "two") as checkpoints:  # the 2-process checkpoint, read by one process
        templates = {k: abstract(getattr(reference, k)) for k in ("params", "opt_state", "ema")}
        restored = checkpoints.restore(STEPS, **templates)
    for name in ("params", "opt_state", "ema"):
        leaves = jax.tree.leaves(getattr(reference, name)), jax.tree.leaves(getattr(restored, name))
        assert len(leaves[0]) == len(leaves[1]) > 0
        for a, b in zip(*leaves, strict=True):
            assert b.sharding.is_equivalent_to(a.sharding, a.ndim)  # restored onto this process's mesh
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=name)


def test_initialize_reads_only_a_multi_process_environment(monkeypatch):
    """A batch script's own python under Slurm (SLURM_NTASKS > 1, outside srun) is one process; a
    coordinator without the process count and id is an error naming them."""
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_STEP_NUM_TASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert maybe_initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES is not set"):
        maybe_initialize_distributed()
