"""Closed-loop evaluation of any chunked policy in Meta-World, many episodes in lockstep.

    policy_fn(observations) -> chunks (b, h, 4) in env space
    observations: a list of b dicts with the raw keys image, wrist_image (uint8 (S, S, 3), only with
    render_images), state (float32 (21,)) and prompt (str), as a LeRobot/LIBERO-style client sends them.

Each episode runs: obs -> act(policy_fn, obs, sigma, rng) -> clip(chunk[:replan_every], -1, 1) -> execute
those actions one by one (openpi's LIBERO client: replan every k steps) -> ... until the first success
(success = info['success'] at any step, Meta-World's official rule) or max_steps.
`act` is the noise-injection hook: the default adds sigma * N(0, I) to the policy's chunk before
execution; a policy wrapper that injects noise before its energy correction passes its own `act`
and draws the noise from the per-episode generators it is given.

Envs: min(batch_envs, episodes) slots per task, stepped in a Python loop. A slot whose episode ended
waits for the next replan step, then starts the next pending episode, so every policy call serves all
running slots at once; the batch is padded to the slot count (repeating the last observation) so a
jitted policy sees one shape.

Reproducible from `seed`: episode j of a task runs object/goal variation j % 50 of
MT1(task, seed + 1000 * (j // 50)) and draws its noise from default_rng([seed, crc32(task), j]), so an
episode's outcome does not depend on batch_envs or on the other tasks (for a per-example policy).
"""

import dataclasses
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jaxtyping import Float
from tqdm.auto import tqdm

from eqx_energy.sim.metaworld import ACTION_DIM, MetaWorldTask, prompt_for
from eqx_energy.sim.report import EvalResult, TaskResult

logger = logging.getLogger(__name__)

MAX_EPISODE_STEPS = 500  # a raw Meta-World env refuses to step past its max_path_length
VARIATIONS_PER_SEED = 50  # MT1 builds 50 object/goal variations per seed
SEED_STRIDE = 1000  # MT1 seed of episodes 50k..50k+49 is seed + SEED_STRIDE * k

Observation = dict[str, Any]
PolicyFn = Callable[[list[Observation]], np.ndarray]
ActFn = Callable[[PolicyFn, list[Observation], float, list[np.random.Generator]], np.ndarray]


def noise_after_policy(policy_fn: PolicyFn, observations: list[Observation], sigma: float,
                       rngs: list[np.random.Generator]) -> Float[np.ndarray, "b h a"]:
    """chunk_i = policy(obs)_i + sigma * N(0, I_(h x 4)), the noise of row i from episode i's generator."""
    chunk = np.asarray(policy_fn(observations), np.float32)
    if sigma == 0.0:
        return chunk
    noise = np.stack([rng.standard_normal(chunk.shape[1:]) for rng in rngs])
    return (chunk + sigma * noise).astype(np.float32)


class ExpertPolicy:
    """Meta-World's scripted experts as a chunked policy_fn: the expert's action at the current state,
    repeated `horizon` times (no look-ahead; with replan_every=1 it is exactly the closed-loop expert).

    The expert reads hand, gripper, object and goal positions, all in the 21-dim state; its 39-dim input is
    rebuilt as [state[:18], state[:18], state[18:]] (the previous-frame block, which the v3 experts do not
    use, is filled with the current frame). The task is looked up from the observation's prompt.
    """

    def __init__(self, tasks: Sequence[str], *, horizon: int = 1):
        os.environ.setdefault("MUJOCO_GL", "egl")
        from metaworld.policies import ENV_POLICY_MAP

        unknown = [t for t in tasks if t not in ENV_POLICY_MAP]
        if unknown or horizon < 1:
            raise ValueError(f"ExpertPolicy needs Meta-World v3 task names with a scripted expert and horizon >= 1; "
                             f"got unknown tasks {unknown}, horizon={horizon}")
        prompts = [prompt_for(t) for t in tasks]
        if len(set(prompts)) != len(prompts):
            raise ValueError(f"ExpertPolicy: tasks {list(tasks)} share a prompt, so the task cannot be told from it")
        self.horizon = horizon
        self._experts = {p: ENV_POLICY_MAP[t]() for p, t in zip(prompts, tasks)}

    def __call__(self, observations: list[Observation]) -> Float[np.ndarray, "b h a"]:
        actions = []
        for obs in observations:
            expert = self._experts.get(obs["prompt"])
            if expert is None:
                raise ValueError(f"ExpertPolicy got prompt {obs['prompt']!r}; it knows {sorted(self._experts)}")
            state = np.asarray(obs["state"], np.float64)
            actions.append(np.clip(expert.get_action(np.concatenate([state[:18], state[:18], state[18:]])), -1, 1))
        return np.repeat(np.asarray(actions, np.float32)[:, None, :], self.horizon, axis=1)


@dataclasses.dataclass
class _Episode:
    index: int
    obs: dict[str, np.ndarray]
    rng: np.random.Generator
    length: int = 0


def _checked(chunk: Any, rows: int, replan_every: int, who: str) -> np.ndarray:
    chunk = np.asarray(chunk)
    if chunk.ndim != 3 or chunk.shape[0] != rows or chunk.shape[2] != ACTION_DIM or chunk.shape[1] < replan_every:
        raise ValueError(f"{who} must return action chunks (b={rows}, h>={replan_every}, {ACTION_DIM}) in env space "
                         f"for b={rows} observations (replan_every={replan_every}); got shape {chunk.shape}")
    return chunk


def _padded(policy_fn: PolicyFn, slots: int, replan_every: int) -> PolicyFn:
    """policy_fn on exactly `slots` rows (the last observation repeated), its output checked and cut back."""

    def call(observations: list[Observation]) -> np.ndarray:
        chunk = policy_fn(observations + [observations[-1]] * (slots - len(observations)))
        return _checked(chunk, slots, replan_every, "policy_fn")[: len(observations)]

    return call


def _run_task(policy_fn: PolicyFn, task: str, episodes: int, *, seed: int, replan_every: int, max_steps: int,
              noise_sigma: float, render_images: bool, image_size: int, cameras: tuple[str, str], slots: int,
              act: ActFn, bar: tqdm) -> TaskResult:
    start = time.perf_counter()
    call = _padded(policy_fn, slots, replan_every)
    envs: list[MetaWorldTask | None] = [None] * slots
    blocks = [-1] * slots
    running: list[_Episode | None] = [None] * slots
    successes, lengths = [False] * episodes, [0] * episodes
    next_episode, task_hash = 0, zlib.crc32(task.encode())
    try:
        while True:
            for s in range(slots):  # a replan step: free slots take the next pending episodes
                if running[s] is None and next_episode < episodes:
                    j, next_episode = next_episode, next_episode + 1
                    block = j // VARIATIONS_PER_SEED
                    if blocks[s] != block:
                        if envs[s] is not None:
                            envs[s].close()
                        envs[s] = MetaWorldTask(task, seed=seed + SEED_STRIDE * block, image_size=image_size,
                                                cameras=cameras, render=render_images)
                        blocks[s] = block
                    obs = envs[s].reset(j % VARIATIONS_PER_SEED)
                    running[s] = _Episode(j, obs, np.random.default_rng([seed, task_hash, j]))
            active = [s for s in range(slots) if running[s] is not None]
            if not active:
                break
            observations = [{**running[s].obs, "prompt": envs[s].prompt} for s in active]
            chunk = act(call, observations, noise_sigma, [running[s].rng for s in active])
            chunk = np.clip(_checked(chunk, len(active), replan_every, "act")[:, :replan_every], -1.0, 1.0)
            for k in range(replan_every):
                for i, s in enumerate(active):
                    episode = running[s]
                    if episode is None:
                        continue
                    episode.obs, success = envs[s].step(chunk[i, k])
                    episode.length += 1
                    if success or episode.length >= max_steps:
                        successes[episode.index], lengths[episode.index] = success, episode.length
                        running[s] = None
                        bar.update(1)
                        bar.set_postfix_str(f"{task} {sum(successes)} successes", refresh=False)
    finally:
        for env in envs:
            if env is not None:
                env.close()
    return TaskResult(task, tuple(successes), tuple(lengths), time.perf_counter() - start)


def evaluate(policy_fn: PolicyFn, tasks: Sequence[str], episodes: int, *, seed: int = 0, replan_every: int = 5,
             max_steps: int = 150, noise_sigma: float = 0.0, render_images: bool = True, batch_envs: int = 8,
             image_size: int = 64, cameras: tuple[str, str] = ("corner2", "gripperPOV"),
             act: ActFn = noise_after_policy, progress: bool = True) -> EvalResult:
    """Success rate (Wilson 95% CI), episode lengths and wall time of `episodes` episodes per task.

    See the module docstring for the loop, the noise hook `act` and how episodes are seeded.
    render_images=False gives state-only observations (no cameras: 20-50x faster steps).
    """
    if not tasks or episodes < 1 or replan_every < 1 or batch_envs < 1 or noise_sigma < 0 or seed < 0:
        raise ValueError(f"evaluate needs tasks, episodes >= 1, replan_every >= 1, batch_envs >= 1, noise_sigma >= 0, "
                         f"seed >= 0; got tasks={list(tasks)}, episodes={episodes}, replan_every={replan_every}, "
                         f"batch_envs={batch_envs}, noise_sigma={noise_sigma}, seed={seed}")
    if not 1 <= max_steps <= MAX_EPISODE_STEPS:
        raise ValueError(f"max_steps must be in [1, {MAX_EPISODE_STEPS}] (Meta-World's episode limit); got {max_steps}")
    settings = {"episodes": episodes, "seed": seed, "replan_every": replan_every, "max_steps": max_steps,
                "noise_sigma": noise_sigma, "render_images": render_images, "batch_envs": batch_envs,
                "image_size": image_size, "cameras": list(cameras), "act": getattr(act, "__name__", repr(act))}
    results = []
    with tqdm(total=len(tasks) * episodes, desc="eval", disable=not progress) as bar:
        for task in tasks:
            result = _run_task(policy_fn, task, episodes, seed=seed, replan_every=replan_every, max_steps=max_steps,
                               noise_sigma=noise_sigma, render_images=render_images, image_size=image_size,
                               cameras=cameras, slots=min(batch_envs, episodes), act=act, bar=bar)
            lo, hi = result.ci95
            logger.info("%s: success %.3f [%.3f, %.3f] over %d episodes, mean length %.1f, %.1f s", task,
                        result.success_rate, lo, hi, episodes, result.mean_length, result.wall_s)
            results.append(result)
    return EvalResult(tuple(results), settings)
