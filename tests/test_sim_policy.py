"""A tiny state-only trained run in closed loop: SimPolicy (noise before correction), the websocket path, eval-sim.

State-only is the efficacy experiment's setting (configs/metaworld_energy.yaml); rendering in the closed
loop is covered by test_sim_evaluate, image policies by the tiny_run tests."""

import json

import numpy as np
import pytest

import correct as correct_cli
from eqx_energy.checkpoints.load_run import load_run
from eqx_energy.data.transforms import Compose, TokenizePrompt
from eqx_energy.data.writer import write_lerobot_dataset
from eqx_energy.serve import PolicyClient, PolicyServer
from eqx_energy.serve.policy import EnergyPolicy, correction_from
from eqx_energy.sim.evaluate import evaluate, noise_after_policy
from eqx_energy.sim.metaworld import ACTION_DIM, STATE_DIM, prompt_for
from eqx_energy.sim.report import load_results
from eqx_energy.sim.policy_adapter import SimPolicy, client_policy_fn, env_units_per_normalized
from eqx_energy.train.config import TrainConfig, from_dict
from eqx_energy.train.loop import run as train_run

pytest.importorskip("metaworld")
pytestmark = pytest.mark.slow  # trains a tiny run, then closed-loop episodes

TASKS = ("reach-v3", "button-press-v3")
HORIZON = 4
EPISODE = dict(seed=3, replan_every=2, max_steps=6, render_images=False, progress=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A state-only Pi0.5-style tiny policy + energy (one token per state bin in the prompt) on Meta-World-shaped
    data without cameras, the energy trained 2 steps (energy_only: a joint step took ~10 s longer to compile,
    and nothing here needs a trained policy)."""
    tmp = tmp_path_factory.mktemp("sim_policy")
    rng = np.random.default_rng(0)
    episodes = [({"state": rng.uniform(-0.5, 0.5, (n, STATE_DIM)).astype(np.float32),
                  "actions": rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32)}, prompt_for(TASKS[i % 2]))
                for i, n in enumerate((7, 9, 8, 6))]
    data = write_lerobot_dataset(tmp / "data", episodes, fps=80)
    cfg = from_dict(TrainConfig, {
        "policy": {"model": {"paligemma_variant": "tiny", "action_expert_variant": "tiny_expert",
                             "siglip_variant": "tiny", "pi05": True, "action_horizon": HORIZON, "max_token_len": 72,
                             "image_keys": [], "vocab_size": 512, "dtype": "float32"},
                   "frozen_dtype": None, "sample_steps": 2},
        "energy": {"context_dim": 64, "action_dim": ACTION_DIM, "hidden": 16, "num_heads": 2, "output": "softplus",
                   "max_horizon": HORIZON},
        "data": {"root": str(data), "action_dim": ACTION_DIM, "image_key": None, "wrist_key": None,
                 "discrete_state": True, "holdout_fraction": 0.25,
                 "batch_size": 8},
        "optim": {"warmup_steps": 1, "ema_decay": 0.9},
        "train": {"mode": "energy_only", "steps": 2, "log_interval": 1, "checkpoint_interval": 2, "mesh": [-1, 1]},
        "correction": {"steps": 2, "alpha": 0.1, "clip_frac": 0.2},
    })
    return train_run(cfg, tmp / "run", progress=False)


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


def _observations(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"state": rng.uniform(-0.5, 0.5, STATE_DIM).astype(np.float32), "prompt": prompt_for(TASKS[i % 2])}
            for i in range(n)]


def test_state_only_run_has_no_cameras_and_one_token_per_state_bin(run):
    assert run.model.policy.img is None and run.cfg.policy.model.prefix_len == 72
    assert EnergyPolicy(run).metadata["camera_keys"] == []
    example = Compose(tuple(run.transforms.inputs))(_observations(1)[0])
    assert "image" not in example and "image_mask" not in example
    tokenizer = next(t for t in run.transforms.inputs if isinstance(t, TokenizePrompt)).tokenizer
    pieces = [tokenizer._sp.id_to_piece(int(t)) for t in example["tokenized_prompt"][example["tokenized_prompt_mask"]]]
    values = [p for p in pieces if p.lstrip("-").isdigit()]
    assert len(values) == STATE_DIM and all(-1 <= int(v) <= 255 for v in values)


def test_env_units_per_normalized_is_the_quantile_half_range(run):
    s = run.norm_stats["actions"]  # Pi0.5 normalizes with quantiles: x = (n + 1) / 2 * (q99 - q01 + 1e-6) + q01
    expected = (np.asarray(s.q99[:ACTION_DIM]) - np.asarray(s.q01[:ACTION_DIM]) + 1e-6) / 2
    np.testing.assert_allclose(env_units_per_normalized(run), expected, rtol=1e-5)


def test_noise_before_uncorrected_policy_equals_noise_after_it(run):
    """Without correction, sigma * eps injected in normalized space comes out as sigma * eps in env units."""
    off = correction_from(run, steps=0)
    obs = _observations(3)
    rngs = lambda: [np.random.default_rng([7, i]) for i in range(3)]  # noqa: E731
    before = SimPolicy(run, off, seed=5)
    after = SimPolicy(run, off, seed=5)
    got = before.act(before, obs, 0.5, rngs())
    want = noise_after_policy(after, obs, 0.5, rngs())
    np.testing.assert_allclose(got, want, atol=1e-4)
    clean = SimPolicy(run, off, seed=5)(obs)
    assert np.abs(got - clean).max() > 0.1


def test_correction_moves_the_noisy_chunk(run):
    obs = _observations(2)
    rngs = lambda: [np.random.default_rng([7, i]) for i in range(2)]  # noqa: E731
    off, on = SimPolicy(run, correction_from(run, steps=0), seed=5), SimPolicy(run, correction_from(run, steps=2), seed=5)
    noisy, corrected = off.act(off, obs, 0.5, rngs()), on.act(on, obs, 0.5, rngs())
    assert noisy.shape == corrected.shape == (2, HORIZON, ACTION_DIM)
    assert not np.allclose(noisy, corrected)


def _recording(policy_fn, chunks: list):
    def call(observations):
        chunk = np.asarray(policy_fn(observations), np.float32)
        chunks.append(chunk)
        return chunk

    return call


def test_closed_loop_in_process_equals_websocket(run):
    """The same seeded episodes through EnergyPolicy in process and through PolicyServer/PolicyClient."""
    correction = correction_from(run, steps=2)
    local, served = [], []
    adapter = SimPolicy(run, correction, seed=0)
    a = evaluate(_recording(adapter, local), TASKS, 2, batch_envs=1, act=adapter.act, **EPISODE)
    with PolicyServer(EnergyPolicy(run, correction, seed=0), host="127.0.0.1", port=0).running() as port:
        with PolicyClient("127.0.0.1", port, wait_s=30.0) as client:
            b = evaluate(_recording(client_policy_fn(client), served), TASKS, 2, batch_envs=1, **EPISODE)
    assert len(local) == len(served) == 2 * 2 * 3  # tasks x episodes x max_steps / replan_every
    for x, y in zip(local, served):
        np.testing.assert_array_equal(x, y)
    assert [t.lengths for t in a.tasks] == [t.lengths for t in b.tasks] == [(6, 6), (6, 6)]


def test_eval_sim_cli_writes_every_setting(run_dir, tmp_path, capsys):
    out = tmp_path / "sim"
    rc = correct_cli.main(["eval-sim", "--ckpt", str(run_dir), "--tasks", "reach-v3", "--episodes", "2",
                           "--max-steps", "4", "--replan-every", "2", "--sigmas", "0,0.5",
                           "--steps", "2", "--alpha", "0.05,0.2", "--batch-envs", "2", "--out", str(out),
                           "--method", "off,gradient,select,oracle", "--num-samples", "2", "--no-progress"])
    assert rc == 0
    results = load_results(out / "results.json")
    names = [f"{c} sigma={s}" for s in ("0", "0.5") for c in ("off", "k=2 alpha=0.05", "k=2 alpha=0.2", "select N=2", "oracle N=2")]
    assert list(results) == names
    paired = json.loads((out / "paired.json").read_text())
    assert set(paired) == set(names) - {"off sigma=0", "off sigma=0.5"}
    assert paired["select N=2 sigma=0.5"]["baseline"] == "off sigma=0.5"
    assert results["oracle N=2 sigma=0"].settings["inference"] == {"method": "oracle", "num_samples": 2}
    assert results["select N=2 sigma=0"].settings["infer_ms_per_call"] > 0
    assert all(r["reach-v3"].episodes == 2 for r in results.values())
    assert results["off sigma=0.5"].settings["correction"]["steps"] == 0
    assert results["k=2 alpha=0.2 sigma=0"].settings["correction"]["alpha"] == pytest.approx(0.2)
    assert not any(r.settings["render_images"] for r in results.values())  # a state-only run renders nothing
    assert (out / "success.png").stat().st_size > 0
    assert correct_cli.main(["eval-sim", "--tasks", "reach-v3"]) == 2
    assert "exactly one of --ckpt" in capsys.readouterr().err
