"""The training program on a tiny LeRobot dataset: exact resume
(interrupted vs uninterrupted, metrics.jsonl compared value for value) and the run dir's contents.
The step itself (modes, NaN skip, sharding) is tested in test_train_step.py."""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eqx_energy.energy import EnergyConfig
from eqx_energy.policy.pi0 import Pi0Config
from eqx_energy.train import loop
from eqx_energy.checkpoints.run import latest_step
from eqx_energy.train.config import ConfigError, DataConfig, OptimConfig, PolicyConfig, TrainConfig, TrainLoopConfig, write_config
from eqx_energy.data.writer import write_lerobot_dataset

TASKS = ("pick up the red block", "open the top drawer")


def write_tiny_dataset(root: Path, lengths=(12, 10, 11, 9, 12)) -> Path:
    """A LeRobot dataset with two 32 px cameras, a 5-d state and 4-d actions, two tasks."""
    rng = np.random.default_rng(0)
    episodes = []
    for i, n in enumerate(lengths):
        frames = {
            "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "state": rng.normal(size=(n, 5)).astype(np.float32),
            "actions": rng.normal(size=(n, 4)).astype(np.float32),
        }
        episodes.append((frames, TASKS[i % 2]))
    return write_lerobot_dataset(root, episodes, fps=10)


def tiny_config(root: Path, *, mode="energy_only", steps=4, ema=0.9, **train) -> TrainConfig:
    """Pi0Config.tiny at 32 px with 4-step chunks, a 32-wide energy head, batch 8 (one per fake device)."""
    return TrainConfig(
        policy=PolicyConfig(
            model=Pi0Config.tiny(action_horizon=4, max_token_len=8, image_resolution=32, vocab_size=128),
            frozen_dtype=None,
        ),
        energy=EnergyConfig(context_dim=64, action_dim=4, hidden=32, num_heads=4, dropout=0.1,
                            output="softplus", max_horizon=4),
        data=DataConfig(root=str(root), action_dim=4, holdout_fraction=0.2, batch_size=8),
        optim=OptimConfig(energy_lr=1e-3, policy_lr=1e-3, warmup_steps=1, ema_decay=ema),
        train=TrainLoopConfig(mode=mode, steps=steps, log_interval=1, checkpoint_interval=2,
                              keep_checkpoints=5, **train),
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, dict]:
    """step -> that step's logged values (the last record wins, as a resumed run re-logs nothing)."""
    out = {}
    for record in read_metrics(run_dir):
        out[record["step"]] = {k: v for k, v in record.items() if not k.startswith(("time", "steps_per", "data_wait"))}
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_lerobot"))


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    """The uninterrupted reference: 4 steps, checkpoints at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("full")
    loop.run(tiny_config(dataset), run_dir, progress=False)
    return run_dir


def test_run_dir_contents(full_run):
    names = {p.name for p in full_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "norm_stats.json", "holdout_episodes.json", "tokenizer.model"} <= names
    assert json.loads((full_run / "holdout_episodes.json").read_text()) != []  # 20% of 5 episodes held out
    records = read_metrics(full_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for k in ("loss", "energy/loss", "energy/accuracy", "grad_norm", "lr/energy", "skipped_steps"):
            assert np.isfinite(r[k]), k
        assert r["skipped_steps"] == 0


def finished_copy(full_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished 4-step run: resuming it restores step 4 and trains nothing (no compile)."""
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    return run_dir


def test_resume_with_changed_config_refused_then_allowed_and_logged(dataset, full_run, tmp_path):
    run_dir = finished_copy(full_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    cfg = tiny_config(dataset)
    changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, energy_lr=2e-3),
                                  train=dataclasses.replace(cfg.train, log_interval=2))
    with pytest.raises(ConfigError) as refused:
        loop.run(changed, run_dir, progress=False)
    assert "step 4" in str(refused.value)
    assert "optim.energy_lr: 0.001 -> 0.002; train.log_interval: 1 -> 2" in str(refused.value)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # nothing written
    loop.run(changed, run_dir, allow_config_change=True, progress=False)
    (logged,) = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert logged["step"] == 4 and logged["changes"] == {"optim.energy_lr": [1e-3, 2e-3], "train.log_interval": [1, 2]}
    assert "energy_lr: 0.002" in (run_dir / "config.yaml").read_text()  # the readable copy follows the invocation
    loop.run(cfg, run_dir, progress=False)  # the checkpoint (step 4, nothing trained since) holds cfg
    assert (run_dir / "config_changes.jsonl").read_text().count("\n") == 1


def test_resume_repairs_a_truncated_metrics_line(dataset, full_run, tmp_path):
    """Killed mid-write: the last metrics line is half a record. Resuming drops it (no crash)."""
    run_dir = finished_copy(full_run, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + whole.splitlines()[-1][:25])
    loop.run(tiny_config(dataset), run_dir, progress=False)
    assert metrics.read_text() == whole
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


@pytest.mark.slow  # a train.py subprocess (imports + compiles) and the resumed run
def test_kill_9_then_resume_reproduces_uninterrupted_losses(dataset, full_run, tmp_path):
    """SIGKILL the real program right after its step-2 checkpoint commits (mid-run: steps 3-4, the
    step-4 save and the plots are still ahead), rerun: the losses equal the uninterrupted run's."""
    cfg = tiny_config(dataset)
    config_path = tmp_path / "config.yaml"
    write_config(cfg, config_path)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config", str(config_path), "--run-dir", str(run_dir), "--no-progress"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 600
        while (latest_step(run_dir) or 0) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no step-2 checkpoint within 10 minutes"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        returncode = proc.wait()
        proc.stderr.close()
    assert returncode == -signal.SIGKILL  # killed, not finished
    assert latest_step(run_dir) == 2
    loop.run(cfg, run_dir, progress=False)
    full, resumed = losses_by_step(full_run), losses_by_step(run_dir)
    assert set(resumed) == {1, 2, 3, 4}
    for step in (1, 2, 3, 4):
        assert resumed[step] == full[step], step
