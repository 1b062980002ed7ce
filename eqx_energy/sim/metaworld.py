"""Meta-World (MuJoCo) tasks with two rendered cameras, and scripted-expert datasets in LeRobot format.

One observation: image (front camera, default corner2) and wrist_image (gripperPOV), uint8 (S, S, 3);
state float32 (21,) = the current-frame part of the 39-dim Meta-World observation (hand xyz, gripper
opening, object positions and quaternions: 18) + goal xyz (3). Actions float32 (4,) in [-1, 1]: mocap
delta xyz (x 0.01 m) and gripper effort; one step is 12.5 ms, so fps = 80.

A noisy-expert episode executes clip(expert(obs) + N(0, noise_std^2 I), -1, 1) and records that
executed action. Episodes stop at the first success or after max_steps. Everything follows from the
seed: MT1(task, seed) variations, and one numpy generator per episode.

metaworld is imported lazily (optional extra `sim`); MUJOCO_GL defaults to egl (CPU offscreen rendering).
"""

import dataclasses
import functools
import logging
import os
import pathlib
import warnings
from typing import Any

import numpy as np

from eqx_energy.data.writer import LeRobotWriter

logger = logging.getLogger(__name__)

FPS = 80
STATE_DIM = 21
ACTION_DIM = 4
PROMPTS = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-v3": "press the button",
    "window-open-v3": "open the window",
}


def prompt_for(task: str) -> str:
    """The language instruction used as the prompt: a fixed sentence, or the task name in words."""
    return PROMPTS.get(task, task.removesuffix("-v3").replace("-", " "))


def _import_metaworld():
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import metaworld
        import mujoco
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as err:
        raise ImportError(f"Meta-World is not installed ({err}); install the extra: pip install -e '.[sim]' "
                          "(metaworld needs `packaging` too)") from err
    return metaworld, mujoco, ENV_POLICY_MAP


@functools.lru_cache(maxsize=32)
def _benchmark(task: str, seed: int):
    """MT1(task, seed): its 50 variations, built once (about 1 s) and shared by every env of that task and seed."""
    metaworld, _, _ = _import_metaworld()
    return metaworld.MT1(task, seed=seed)


class MetaWorldTask:
    """One Meta-World task with its scripted expert and a fast two-camera renderer (no shadows/reflections/MSAA).

    render=False builds no renderer: observations then hold only `state` (about 20-50x faster steps).
    """

    def __init__(self, task: str, *, seed: int, image_size: int = 64,
                 cameras: tuple[str, str] = ("corner2", "gripperPOV"), render: bool = True):
        metaworld, mujoco, policies = _import_metaworld()
        warnings.filterwarnings("ignore", module="gymnasium")
        warnings.filterwarnings("ignore", module="metaworld")
        if task not in metaworld.MT1.ENV_NAMES:
            raise ValueError(f"unknown Meta-World task {task!r}; known v3 tasks include {sorted(PROMPTS)}")
        self.task, self.prompt, self.cameras = task, prompt_for(task), cameras
        self._mujoco = mujoco
        self._benchmark = _benchmark(task, seed)
        self.env = self._benchmark.train_classes[task]()
        self.expert = policies[task]()
        self.env.model.vis.quality.offsamples = 0
        self._renderer = mujoco.Renderer(self.env.model, image_size, image_size) if render else None
        self._obs: np.ndarray | None = None

    @property
    def num_variations(self) -> int:
        return len(self._benchmark.train_tasks)

    def _render(self, camera: str) -> np.ndarray:
        flags = self._mujoco.mjtRndFlag
        self._renderer.update_scene(self.env.data, camera=camera)
        self._renderer.scene.flags[flags.mjRND_SHADOW] = 0
        self._renderer.scene.flags[flags.mjRND_REFLECTION] = 0
        return self._renderer.render()[::-1].copy()  # MuJoCo's offscreen frames are upside-down

    def observation(self) -> dict[str, np.ndarray]:
        """image, wrist_image uint8 (S, S, 3) (only when rendering); state float32 (21,)."""
        state = np.concatenate([self._obs[:18], self._obs[36:39]]).astype(np.float32)
        if self._renderer is None:
            return {"state": state}
        return {"image": self._render(self.cameras[0]), "wrist_image": self._render(self.cameras[1]), "state": state}

    def reset(self, variation: int) -> dict[str, np.ndarray]:
        """Start the episode on object/goal variation `variation` (mod the 50 variations of this seed)."""
        self.env.set_task(self._benchmark.train_tasks[variation % self.num_variations])
        self._obs, _ = self.env.reset()
        return self.observation()

    def expert_action(self) -> np.ndarray:
        return np.clip(self.expert.get_action(self._obs), -1.0, 1.0).astype(np.float32)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        """Execute a 4-dim action (clipped to [-1, 1]); returns the new observation and info['success']."""
        self._obs, _, _, _, info = self.env.step(np.clip(np.asarray(action, np.float64), -1.0, 1.0))
        return self.observation(), bool(info["success"])

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
        self.env.close()


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """What to record: tasks x episodes_per_task episodes, a fraction of them with noisy expert actions."""

    tasks: tuple[str, ...] = ("reach-v3", "drawer-open-v3", "button-press-v3")
    episodes_per_task: int = 8
    seed: int = 0
    image_size: int = 64
    cameras: tuple[str, str] = ("corner2", "gripperPOV")
    images: bool = True  # False: state-only episodes (no rendering, no image columns; 20-50x faster)
    noisy_fraction: float = 0.25
    noise_std: float = 0.5
    max_steps: int = 150

    def __post_init__(self):
        if not self.tasks or self.episodes_per_task < 1 or self.max_steps < 1:
            raise ValueError(f"need at least one task, episodes_per_task >= 1 and max_steps >= 1; got {self}")
        if not 0.0 <= self.noisy_fraction <= 1.0:
            raise ValueError(f"noisy_fraction must be in [0, 1]; got {self.noisy_fraction}")


def rollout(task: MetaWorldTask, variation: int, noise_std: float, max_steps: int,
            rng: np.random.Generator) -> tuple[dict[str, np.ndarray], bool]:
    """One expert episode (noise_std > 0: noisy expert): per-frame arrays and whether it succeeded."""
    obs, success = task.reset(variation), False
    frames: dict[str, list[Any]] = {key: [] for key in (*obs, "actions", "noise_std")}
    for _ in range(max_steps):
        action = task.expert_action()
        if noise_std > 0:
            action = np.clip(action + rng.normal(0.0, noise_std, ACTION_DIM), -1.0, 1.0).astype(np.float32)
        for key, value in obs.items():
            frames[key].append(value)
        frames["actions"].append(action)
        frames["noise_std"].append(np.float32(noise_std))
        obs, success = task.step(action)
        if success:
            break
    return {k: np.stack(v) for k, v in frames.items()}, success


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def generate_dataset(root: str | pathlib.Path, config: GenerateConfig = GenerateConfig(), *,
                     overwrite: bool = False) -> dict[str, Any]:
    """Record the episodes (tasks interleaved) into a LeRobot v2.1 dataset at `root`; returns a summary."""
    noisy_per_task = int(round(config.noisy_fraction * config.episodes_per_task))
    seeds = np.random.SeedSequence(config.seed).spawn(len(config.tasks) * config.episodes_per_task)
    tasks = {name: MetaWorldTask(name, seed=config.seed, image_size=config.image_size, cameras=config.cameras,
                                 render=config.images)
             for name in config.tasks}
    successes = {name: [0, 0] for name in config.tasks}  # clean, noisy
    frames = 0
    try:
        with LeRobotWriter(root, fps=FPS, robot_type="sawyer", overwrite=overwrite) as writer:
            for j in range(config.episodes_per_task):
                noisy = j >= config.episodes_per_task - noisy_per_task
                for t, (name, task) in enumerate(tasks.items()):
                    rng = np.random.default_rng(seeds[j * len(tasks) + t])
                    episode, success = rollout(task, j, config.noise_std if noisy else 0.0, config.max_steps, rng)
                    writer.add_episode(episode, task.prompt)
                    successes[name][int(noisy)] += int(success)
                    frames += len(episode["actions"])
    finally:
        for task in tasks.values():
            task.close()
    summary = {"root": str(root), "episodes": len(config.tasks) * config.episodes_per_task, "frames": frames,
               "noisy_per_task": noisy_per_task,
               "success_clean": {k: _rate(v[0], config.episodes_per_task - noisy_per_task) for k, v in successes.items()},
               "success_noisy": {k: _rate(v[1], noisy_per_task) for k, v in successes.items()}}
    logger.info("generated %s", summary)
    return summary
