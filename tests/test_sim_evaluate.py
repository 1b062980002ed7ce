"""Closed-loop Meta-World evaluation with the scripted expert as the policy: success, noise, seeding, report."""

import json

import numpy as np
import pytest

pytest.importorskip("metaworld")

from eqx_energy.sim.evaluate import ExpertPolicy, evaluate, noise_after_policy  # noqa: E402
from eqx_energy.sim.metaworld import MetaWorldTask  # noqa: E402
from eqx_energy.sim.report import (EvalResult, TaskResult, load_results, markdown_table,  # noqa: E402
                                   wilson_interval, write_report)

FAST = dict(render_images=False, progress=False)


class Recorder:
    """Wraps a policy_fn and keeps every observation's state and prompt it was called with."""

    def __init__(self, policy_fn):
        self.policy_fn, self.states, self.prompts = policy_fn, [], []

    def __call__(self, observations):
        self.states += [o["state"].copy() for o in observations]
        self.prompts += [o["prompt"] for o in observations]
        return self.policy_fn(observations)


PUSH = dict(seed=0, replan_every=1, max_steps=100, noise_sigma=1.0, **FAST)


@pytest.fixture(scope="module")
def push_runs():
    """push-v3, 6 episodes of 100 steps, expert replanning every step, clean and with sigma = 1.0 noise."""
    recorder = Recorder(ExpertPolicy(["push-v3"]))
    noisy = evaluate(recorder, ["push-v3"], 6, batch_envs=3, **PUSH)
    clean = evaluate(ExpertPolicy(["push-v3"]), ["push-v3"], 6, batch_envs=3, **{**PUSH, "noise_sigma": 0.0})
    return {0.0: clean, 1.0: noisy, "states": recorder.states}


@pytest.mark.parametrize("k,n", [(8, 10), (0, 10), (10, 10), (1, 4), (120, 200)])
def test_wilson_matches_hand_computed(k, n):
    z = 1.959963984540054
    # The Wilson bounds are the roots pi of (p - pi)^2 = z^2 pi (1 - pi) / n.
    p = k / n
    roots = np.sort(np.roots([1 + z * z / n, -(2 * p + z * z / n), p * p]).real)
    np.testing.assert_allclose(wilson_interval(k, n), roots, atol=1e-12)
    # Closed forms at the edges: 0/n -> [0, z^2 / (n + z^2)], n/n -> [n / (n + z^2), 1].
    if k == 0:
        assert wilson_interval(k, n) == (0.0, pytest.approx(z * z / (n + z * z)))
    if k == n:
        assert wilson_interval(k, n) == (pytest.approx(n / (n + z * z)), 1.0)
    with pytest.raises(ValueError, match="successes=3, trials=2"):
        wilson_interval(3, 2)


def test_expert_from_state_matches_env_expert():
    """The state-only expert (previous-frame block filled with the current one) acts as the env's expert, up to
    the float32 rounding of the state."""
    for name in ("reach-v3", "push-v3", "pick-place-v3"):
        task, policy = MetaWorldTask(name, seed=0, render=False), ExpertPolicy([name], horizon=3)
        try:
            obs = task.reset(2)
            for _ in range(25):
                chunk = policy([{**obs, "prompt": task.prompt}])
                assert chunk.shape == (1, 3, 4) and np.array_equal(chunk[0], np.repeat(chunk[:, :1], 3, 1)[0])
                np.testing.assert_allclose(chunk[0, 0], task.expert_action(), rtol=0, atol=1e-6)
                obs, _ = task.step(chunk[0, 0])
        finally:
            task.close()
    with pytest.raises(ValueError, match="prompt 'open the drawer'"):
        ExpertPolicy(["reach-v3"])([{"state": np.zeros(21, np.float32), "prompt": "open the drawer"}])


def test_expert_solves_reach():
    result = evaluate(ExpertPolicy(["reach-v3"]), ["reach-v3"], 5, seed=0, replan_every=1, max_steps=150,
                      batch_envs=3, **FAST)
    reach = result["reach-v3"]
    assert reach.success_rate == 1.0 and reach.episodes == 5 and result.overall.success_rate == 1.0
    assert 20 < reach.mean_length < 100  # metaworld.md: 45 steps on average
    assert reach.ci95 == wilson_interval(5, 5) and reach.wall_s > 0
    chunked = evaluate(ExpertPolicy(["reach-v3"], horizon=8), ["reach-v3"], 5, seed=0, replan_every=4,
                       max_steps=150, batch_envs=3, **FAST)
    assert chunked["reach-v3"].success_rate >= 0.8  # open loop for 4 steps still reaches


def test_noise_lowers_success_on_push(push_runs):
    clean, noisy = push_runs[0.0]["push-v3"], push_runs[1.0]["push-v3"]
    assert clean.success_rate == 1.0
    assert noisy.success_rate <= 0.5  # metaworld.md: 0.04 at sigma 1.0 within 100 steps
    assert noisy.mean_length > clean.mean_length


def test_reproducible_and_independent_of_batching(push_runs):
    """Same seed -> the same episodes bit for bit, whatever batch_envs; another seed -> other episodes."""
    recorder = Recorder(ExpertPolicy(["push-v3"]))
    again = evaluate(recorder, ["push-v3"], 6, batch_envs=2, **PUSH)["push-v3"]
    noisy = push_runs[1.0]["push-v3"]
    assert (again.successes, again.lengths) == (noisy.successes, noisy.lengths)
    # Every state the policy saw, bit for bit (the slots interleave differently, and the padded rows differ).
    assert sorted(set(a.tobytes() for a in recorder.states)) == sorted(set(a.tobytes() for a in push_runs["states"]))
    other = Recorder(ExpertPolicy(["push-v3"]))
    evaluate(other, ["push-v3"], 2, batch_envs=2, **{**PUSH, "seed": 1, "max_steps": 3})
    assert not any(np.array_equal(a, b) for a, b in zip(other.states, recorder.states))


def test_variations_continue_past_50_with_another_seed():
    """Episode j runs variation j % 50 of MT1(seed + 1000 * (j // 50)): episode 50 is not episode 0 again."""
    recorder = Recorder(ExpertPolicy(["reach-v3"]))
    result = evaluate(recorder, ["reach-v3"], 52, seed=0, replan_every=1, max_steps=1, batch_envs=2, **FAST)
    assert result["reach-v3"].lengths == (1,) * 52 and len(recorder.states) == 52
    goals = np.stack(recorder.states)[:, 18:21]  # first observation of each episode, in episode order
    assert len({g.tobytes() for g in goals}) == 52
    task = MetaWorldTask("reach-v3", seed=1000, render=False)
    try:
        np.testing.assert_array_equal(task.reset(1)["state"], recorder.states[51])
    finally:
        task.close()


def test_act_hook_and_images():
    """A custom noise hook sees sigma and one generator per episode; render_images adds both cameras."""
    calls = []

    def act(policy_fn, observations, sigma, rngs):
        calls.append((len(observations), sigma, len(rngs)))
        assert {"image", "wrist_image", "state", "prompt"} <= set(observations[0])
        assert observations[0]["image"].shape == observations[0]["wrist_image"].shape == (16, 16, 3)
        return noise_after_policy(policy_fn, observations, sigma, rngs)

    result = evaluate(ExpertPolicy(["reach-v3"], horizon=2), ["reach-v3"], 2, seed=0, replan_every=2, max_steps=4,
                      noise_sigma=0.3, render_images=True, image_size=16, batch_envs=2, act=act, progress=False)
    assert calls == [(2, 0.3, 2)] * 2 and result["reach-v3"].lengths == (4, 4)
    assert result.settings["act"] == "act" and result.settings["noise_sigma"] == 0.3


def test_bad_arguments_are_clear():
    def wrong_width(observations):
        return np.zeros((len(observations), 4, 7), np.float32)

    with pytest.raises(ValueError, match=r"\(b=2, h>=3, 4\).*got shape \(2, 4, 7\)"):
        evaluate(wrong_width, ["reach-v3"], 2, replan_every=3, batch_envs=2, **FAST)
    with pytest.raises(ValueError, match="max_steps must be in"):
        evaluate(wrong_width, ["reach-v3"], 2, max_steps=501, **FAST)
    with pytest.raises(ValueError, match="replan_every >= 1"):
        evaluate(wrong_width, ["reach-v3"], 2, replan_every=0, **FAST)


def test_report_writes_json_markdown_png(push_runs, tmp_path):
    runs = {"sigma 0": push_runs[0.0], "sigma 1": push_runs[1.0]}
    paths = write_report(runs, tmp_path / "report")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000
    data = json.loads(paths["json"].read_text())
    noisy = push_runs[1.0]["push-v3"]
    assert data["sigma 1"]["tasks"]["push-v3"]["success_rate"] == noisy.success_rate
    assert data["sigma 1"]["tasks"]["push-v3"]["ci95"] == list(noisy.ci95)
    assert data["sigma 1"]["settings"]["noise_sigma"] == 1.0
    back = load_results(paths["json"])
    for name, run in runs.items():
        assert back[name].tasks[0].successes == run.tasks[0].successes
        assert back[name].tasks[0].lengths == run.tasks[0].lengths
        assert back[name].settings == json.loads(json.dumps(dict(run.settings)))
    table = paths["markdown"].read_text()
    assert table.splitlines()[0] == "| task | sigma 0 | sigma 1 |"
    assert "| push-v3 | 1.00 [0.61, 1.00]" in table and table.count("\n") == 4


def test_overall_pools_episodes():
    result = EvalResult((TaskResult("a", (True, False), (3, 10), 1.0), TaskResult("b", (True,) * 3, (5, 5, 5), 2.0)),
                        {})
    overall = result.overall
    assert overall.success_rate == 0.8 and overall.ci95 == wilson_interval(4, 5) and overall.wall_s == 3.0
    assert overall.mean_length == pytest.approx(28 / 5)
    assert overall.summary()["mean_length_success"] == pytest.approx(18 / 4)
    assert "(5 steps, n=3) | - |" in markdown_table({"x": result, "y": EvalResult(result.tasks[:1], {})})
    with pytest.raises(KeyError, match="no result for task 'c'"):
        result["c"]
