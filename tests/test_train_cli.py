"""train.py: every config in configs/ parses; user errors exit non-zero with one clear line on
stderr (no traceback); --new-run refuses a run with checkpoints; a resume with a changed config is
refused with the diff unless --allow-config-change; the demo config trains and resumes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train_loop import read_metrics, write_tiny_dataset

import train
from eqx_energy.checkpoints.run import RunCheckpoints
from eqx_energy.train.config import CONFIG_DIR, TrainConfig, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_lerobot"))


def test_configs_dir_is_the_repos():
    assert Path(CONFIG_DIR).resolve() == ROOT / "configs" and CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses(path):
    cfg = load_config(TrainConfig, path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.energy.action_dim == cfg.data.action_dim
    assert cfg.energy.context_dim == cfg.policy.model.prefix_width
    assert load_config(TrainConfig, path.stem) == cfg  # a bare name resolves in configs/


def fails(capsys, argv):
    """Run train.main(argv); return its one stderr line (asserting exit 2 and no traceback)."""
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_key(capsys, tmp_path):
    line = fails(capsys, ["--config", "demo", "--run-dir", str(tmp_path), "--set", "train.stepz=3"])
    assert "train.stepz" in line and "steps" in line


def test_wrong_type(capsys, tmp_path):
    line = fails(capsys, ["--config", "demo", "--run-dir", str(tmp_path), "--set", "train.steps=many"])
    assert "train.steps" in line and "int" in line


def test_unknown_config_name(capsys, tmp_path):
    line = fails(capsys, ["--config", "dmeo", "--run-dir", str(tmp_path)])
    assert "demo" in line


def test_missing_dataset(capsys, tmp_path):
    line = fails(capsys, ["--config", "demo", "--run-dir", str(tmp_path / "run"),
                          "--set", f"data.root={tmp_path / 'nowhere'}"])
    assert "data.root" in line and "nowhere" in line
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_missing_checkpoint(capsys, tmp_path, dataset):
    line = fails(capsys, ["--config", "demo", "--run-dir", str(tmp_path / "run"),
                          "--set", f"data.root={dataset}", "--set", f"policy.checkpoint={tmp_path / 'params'}"])
    assert "policy.checkpoint" in line and "params" in line


def checkpoint_at_step_3(run_dir, config):
    """A run dir whose only checkpoint (step 3) saved `config`."""
    with RunCheckpoints(run_dir, async_save=False) as checkpoints:
        checkpoints.save(3, params={"w": np.zeros(2, np.float32)}, opt_state={"n": np.zeros((), np.int32)},
                         skipped=0, config=config)


def test_new_run_refuses_run_with_checkpoints(capsys, tmp_path, dataset):
    checkpoint_at_step_3(tmp_path, {"run": "earlier"})
    line = fails(capsys, ["--config", "demo", "--run-dir", str(tmp_path), "--set", f"data.root={dataset}",
                          "--new-run"])
    assert "--new-run" in line and "step 3" in line
    assert not (tmp_path / "config.yaml").exists()  # refused before anything is written


def test_resume_with_changed_config_refused_with_the_diff(capsys, tmp_path, dataset):
    """The checkpoint saved the demo config; resuming with two values changed names both, old -> new,
    and writes nothing (config.yaml is not replaced)."""
    common = ["--config", "demo", "--run-dir", str(tmp_path), "--set", f"data.root={dataset}"]
    checkpoint_at_step_3(tmp_path, to_dict(load_config(TrainConfig, "demo", common[-1:])))
    line = fails(capsys, [*common, "--set", "optim.energy_lr=1e-4", "--set", "loss.tau=0.2"])
    assert "step 3" in line and "--allow-config-change" in line
    assert "optim.energy_lr: 0.001 -> 0.0001" in line and "loss.tau: 0.5 -> 0.2" in line
    assert "data.root" not in line  # unchanged keys are not listed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_subprocess_error_is_one_line(tmp_path):
    """The real entry point: exit status 2 and a single stderr line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "demo", "--run-dir", str(tmp_path), "--set", "optim.energy_lr=fast"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.energy_lr" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_trains_then_resumes(tmp_path, dataset, capsys):
    """demo.yaml at a reduced step count on the tiny dataset: 2 steps, then the same command with
    steps=4 is refused (a changed config) until --allow-config-change, which resumes from the
    step-2 checkpoint, finishes, and logs the change in the run. (The lr schedule's length is fixed, so
    the resumed run's step is the first run's, compiled once. The step draws 2 policy samples of 1 flow
    step instead of 4 of 5: the same program but for its scans' lengths; the test ran 74 -> 65 s.)"""
    common = ["--config", "demo", "--run-dir", str(tmp_path), "--no-progress", "--set", f"data.root={dataset}",
              "--set", "optim.warmup_steps=1", "--set", "optim.decay_steps=8", "--set", "train.log_interval=1",
              "--set", "train.checkpoint_interval=2", "--set", "data.batch_size=8",
              "--set", "loss.num_policy_samples=2", "--set", "loss.policy_sample_steps=1"]
    assert train.main([*common, "--set", "train.steps=2"]) == 0
    assert RunCheckpoints(tmp_path).latest_step == 2
    assert "train.steps: 2 -> 4" in fails(capsys, [*common, "--set", "train.steps=4"])
    assert train.main([*common, "--set", "train.steps=4", "--allow-config-change"]) == 0
    (change,) = [json.loads(line) for line in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert change["step"] == 2 and change["changes"] == {"train.steps": [2, 4]}
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in records)
    assert RunCheckpoints(tmp_path).latest_step == 4
    assert "run saved in" in capsys.readouterr().out


def test_state_only_data_needs_a_state_only_model(capsys, tmp_path, dataset):
    line = fails(capsys, ["--config", "demo", "--run-dir", str(tmp_path / "run"), "--set", f"data.root={dataset}",
                          "--set", "data.image_key=null", "--set", "data.wrist_key=null"])
    assert "policy.model.image_keys" in line and "state-only" in line
    line = fails(capsys, ["--config", "demo", "--run-dir", str(tmp_path / "run"), "--set", f"data.root={dataset}",
                          "--set", "data.image_key=null"])
    assert "data.wrist_key" in line
    assert not (tmp_path / "run").exists()
