"""A tiny Meta-World dataset generates from a seed, reads back through LeRobotSource, and is reproducible."""

import numpy as np
import pytest

pytest.importorskip("metaworld")

from eqx_energy.data.source import LeRobotSource  # noqa: E402
from eqx_energy.sim.generate import main  # noqa: E402
from eqx_energy.sim.metaworld import STATE_DIM, GenerateConfig, MetaWorldTask, generate_dataset  # noqa: E402

CONFIG = GenerateConfig(tasks=("reach-v3", "button-press-v3"), episodes_per_task=2, seed=3, image_size=32,
                        noisy_fraction=0.5, noise_std=0.3, max_steps=12)


@pytest.mark.slow  # ~10 s of CPU; ~20-30 s wall on the shared 2-core machine
def test_tiny_dataset_generates_and_reads_back(tmp_path):
    summary = generate_dataset(tmp_path / "a", CONFIG)
    source = LeRobotSource(tmp_path / "a", action_horizon=5)
    assert summary["episodes"] == 4 and len(source) == summary["frames"] <= 4 * 12
    assert source.info["fps"] == 80 and source.tasks == {0: "reach the goal position", 1: "press the button"}
    items = [source[i] for i in range(len(source))]
    for item in items:
        assert item["image"].shape == item["wrist_image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
        assert item["state"].shape == (STATE_DIM,) and item["actions"].shape == (5, 4)
        assert np.abs(item["actions"]).max() <= 1.0
    noise = {int(i["episode_index"]): round(float(i["noise_std"]), 6) for i in items}
    assert noise == {0: 0.0, 1: 0.0, 2: 0.3, 3: 0.3}  # tasks interleaved; the last half of each task is noisy
    prompts = {int(i["episode_index"]): i["prompt"] for i in items}
    assert prompts == {0: "reach the goal position", 1: "press the button", 2: "reach the goal position",
                       3: "press the button"}
    assert not np.array_equal(items[0]["image"], items[-1]["image"])  # the scene is really rendered

    main(["--out", str(tmp_path / "b"), "--tasks", "reach-v3,button-press-v3", "--episodes-per-task", "2",
          "--seed", "3", "--image-size", "32", "--noisy-fraction", "0.5", "--noise-std", "0.3", "--max-steps", "12"])
    again = LeRobotSource(tmp_path / "b", action_horizon=5)
    assert len(again) == len(source)
    for i in range(0, len(source), 7):  # same seed, same data
        for key in ("image", "wrist_image", "state", "actions"):
            np.testing.assert_array_equal(again[i][key], items[i][key])


def test_state_only_dataset_has_no_image_columns(tmp_path):
    main(["--out", str(tmp_path / "s"), "--tasks", "reach-v3", "--episodes-per-task", "2", "--seed", "3",
          "--noisy-fraction", "0", "--max-steps", "8", "--no-images"])
    source = LeRobotSource(tmp_path / "s", action_horizon=3)
    assert not any(f["dtype"] == "image" for f in source.info["features"].values())
    item = source[0]
    assert "image" not in item and item["state"].shape == (STATE_DIM,) and item["actions"].shape == (3, 4)
    task = MetaWorldTask("reach-v3", seed=3, render=False)  # the generator's seed: its first episode's start state
    try:
        np.testing.assert_array_equal(task.reset(0)["state"], item["state"])
    finally:
        task.close()


def test_expert_succeeds_and_bad_task_is_clear():
    task = MetaWorldTask("reach-v3", seed=0, image_size=16)
    try:
        obs, success = task.reset(0), False
        for _ in range(150):
            obs, success = task.step(task.expert_action())
            if success:
                break
        assert success and obs["state"].dtype == np.float32
    finally:
        task.close()
    with pytest.raises(ValueError, match="unknown Meta-World task 'reach'"):
        MetaWorldTask("reach", seed=0)
