"""A trained run as an openpi-style policy (`infer(obs) -> dict`, `metadata`) for PolicyServer.

    obs (the run's dataset keys: image, wrist_image, state, prompt)
      -> run.transforms.inputs -> Pi0.sample_actions -> [perturb] -> correct (when steps > 0)
      -> run.transforms.outputs (unnormalize, env dims) -> {"actions": (h, action_dim), "policy_timing"}

`perturb` is the closed-loop noise hook: it sees the sampled chunk in the model's normalized space,
(b, h, action_dim), and returns it perturbed, before correction (DESIGN: sample -> noise -> correct).
`infer_batch` serves many observations in one policy call (closed-loop evaluation).
openpi's LIBERO client sends `observation/image`, `observation/wrist_image`, `observation/state`
(its repack step's names): the `observation/` prefix is dropped on the way in, so that client
works unchanged against a run trained on the LeRobot LIBERO keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eqx_energy.checkpoints.load_run import LoadedRun
from eqx_energy.correct import CorrectionConfig, correct
from eqx_energy.data.transforms import Compose
from eqx_energy.policy.pi0 import Observation
from eqx_energy.train.loop import model_inputs

Perturb = Callable[[np.ndarray], np.ndarray]
_OPENPI_PREFIX = "observation/"


def _dataset_keys(obs: dict) -> dict:
    """openpi client keys (`observation/image`) -> the run's dataset keys (`image`)."""
    return {k.removeprefix(_OPENPI_PREFIX): v for k, v in obs.items()}


class EnergyPolicy:
    """openpi BasePolicy shape around a loaded run; `correction=None` uses the run's config,
    `CorrectionConfig(steps=0)` turns correction off."""

    run: LoadedRun
    correction: CorrectionConfig
    metadata: dict

    def __init__(self, run: LoadedRun, correction: CorrectionConfig | None = None, *, seed: int = 0):
        self.run = run
        self.correction = run.cfg.correction if correction is None else correction
        self._inputs = Compose(tuple(run.transforms.inputs))
        self._outputs = Compose(tuple(run.transforms.outputs))
        self._key = jax.random.key(seed)
        self._calls = 0
        model = run.cfg.policy.model
        cameras = [k for k in (run.cfg.data.image_key, run.cfg.data.wrist_key) if k]  # [] = state-only
        self.metadata = {
            "policy": "eqx_energy",
            "run_dir": str(run.run_dir),
            "step": run.step,
            "action_horizon": model.action_horizon,
            "action_dim": run.cfg.data.action_dim,
            "camera_keys": cameras,
            "observation_keys": [*cameras, run.cfg.data.state_key, "prompt"],
            "correction": {"steps": self.correction.steps, "alpha": float(self.correction.alpha),
                           "clip_frac": float(self.correction.clip_frac), "first_only": self.correction.first_only},
        }

    def infer(self, obs: dict) -> dict:
        """One observation -> {"actions": (h, action_dim) float32 in env units, "policy_timing"}."""
        reply = self.infer_batch([_dataset_keys(obs) if isinstance(obs, dict) else obs])
        return {"actions": reply["actions"][0], "policy_timing": reply["policy_timing"]}

    def infer_batch(self, observations: list[dict], perturb: Perturb | None = None) -> dict[str, Any]:
        """b observations in one call -> {"actions": (b, h, action_dim), "policy_timing": {...}}."""
        if not observations:
            raise ValueError("infer_batch needs at least one observation; got an empty list")
        start = time.monotonic()
        examples = []
        for obs in observations:
            if not isinstance(obs, dict) or "prompt" not in obs:
                raise ValueError(f"an observation must be a dict with a 'prompt' and keys "
                                 f"{self.metadata['observation_keys']}; got {sorted(obs) if isinstance(obs, dict) else type(obs)}")
            example = self._inputs({k: v for k, v in obs.items() if k != "actions"})
            examples.append(model_inputs(example))
        batch = jax.tree.map(lambda *xs: np.stack(xs), *examples)
        key = jax.random.fold_in(self._key, self._calls)
        self._calls += 1
        policy, energy = self.run.model.policy, self.run.model.energy
        actions, context, mask = policy.sample_actions(key, Observation.from_dict(batch), self.run.cfg.policy.sample_steps)
        actions = jax.block_until_ready(actions)
        sampled = time.monotonic()
        if perturb is not None:
            moved = np.asarray(perturb(np.asarray(actions[..., : energy.action_dim])), np.float32)
            actions = actions.at[..., : energy.action_dim].set(moved)
        timing = {"sample_ms": (sampled - start) * 1000}
        corrected = time.monotonic()
        if self.correction.steps > 0:
            actions, _ = correct(energy, context, actions, mask, self.correction)
            actions = jax.block_until_ready(actions)
        timing["correction_ms"] = (time.monotonic() - corrected) * 1000
        padded = np.asarray(actions)
        out = [self._outputs({"state": batch["state"][i], "actions": padded[i]})["actions"] for i in range(len(padded))]
        timing["infer_ms"] = (time.monotonic() - start) * 1000
        return {"actions": np.stack(out).astype(np.float32), "policy_timing": timing}


def correction_from(run: LoadedRun, *, steps: int | None = None, alpha: float | None = None,
                    clip_frac: float | None = None, first_only: bool | None = None) -> CorrectionConfig:
    """The run's correction config with the given fields replaced (None keeps the run's value)."""
    c = run.cfg.correction
    return CorrectionConfig(
        steps=c.steps if steps is None else steps,
        alpha=c.alpha if alpha is None else jnp.float32(alpha),
        clip_frac=c.clip_frac if clip_frac is None else jnp.float32(clip_frac),
        first_only=c.first_only if first_only is None else first_only,
        act_dim=c.act_dim, clip_floor=c.clip_floor, method=c.method,
        noise_scale=c.noise_scale, noise_decay=c.noise_decay,
    )
