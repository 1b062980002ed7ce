"""A trained run as an openpi-style policy (`infer(obs) -> dict`, `metadata`) for PolicyServer.

    obs (the run's dataset keys: image, wrist_image, state, prompt)
      -> run.transforms.inputs -> energy_sampling.propose (n candidates) -> [perturb] -> energy_sampling.decide
      -> run.transforms.outputs (unnormalize, env dims) -> {"actions": (h, action_dim), "policy_timing"}

The method (off, gradient, select, guided, oracle) is an `InferenceConfig`, the same entry point the
in-process evaluations use, so a served chunk equals the in-process one for the same key. With the
oracle the reply also carries every candidate in env units, (b, n, h, action_dim), for the caller to pick.
`perturb` is the closed-loop noise hook: it sees each sampled candidate in the model's normalized space,
(b, h, action_dim), and returns it perturbed, before the energy acts (DESIGN: sample -> noise -> correct).
`infer_batch` serves many observations in one policy call (closed-loop evaluation).
openpi's LIBERO client sends `observation/image`, `observation/wrist_image`, `observation/state`
(its repack step's names): the `observation/` prefix is dropped on the way in, so that client
works unchanged against a run trained on the LeRobot LIBERO keys.

Every observation is checked against the run's schema (`observation_schema`, published in the
metadata) before any transform, and the actions after: a robot must never get actions computed
from a misread observation, nor non-finite or mis-shaped ones.

    camera keys  uint8 (H, W, 3), any 1 <= H, W <= MAX_IMAGE_SIDE (resized with pad to the model's size)
    state key    float (state_dim,), finite; state_dim is the run's (its norm stats')
    "prompt"     str

Keys outside the schema are ignored (openpi's transforms ignore them too). A violation raises
`ObservationError` naming the key, what was expected and what arrived; bad actions raise
`ActionError`.
"""

from __future__ import annotations

import reprlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eqx_energy.checkpoints.load_run import LoadedRun
from eqx_energy.correct import CorrectionConfig
from eqx_energy.data.transforms import Compose
from eqx_energy.policy.energy_sampling import GuidanceConfig, InferenceConfig, decide, propose
from eqx_energy.policy.pi0 import Observation
from eqx_energy.select import SelectionConfig
from eqx_energy.train.inputs import model_inputs

Perturb = Callable[[np.ndarray], np.ndarray]
_OPENPI_PREFIX = "observation/"
MAX_IMAGE_SIDE = 4096


class ObservationError(ValueError):
    """An observation that does not match the served run's schema."""


class ActionError(RuntimeError):
    """The policy computed actions it must not return (non-finite or mis-shaped)."""


def observation_schema(run: LoadedRun) -> dict[str, dict[str, Any]]:
    """{key: {"shape": [...], "dtype": ...}} of what the run reads; None in a shape is any size."""
    data = run.cfg.data
    if "state" not in run.norm_stats:
        raise ValueError(f"the run's norm stats have no 'state' entry (keys {sorted(run.norm_stats)}), so its "
                         f"state dim is unknown; recompute the norm stats of {run.run_dir.name}")
    schema: dict[str, dict[str, Any]] = {k: {"shape": [None, None, 3], "dtype": "uint8"}
                                         for k in (data.image_key, data.wrist_key) if k}
    schema[data.state_key] = {"shape": [len(run.norm_stats["state"].mean)], "dtype": "float32"}
    schema["prompt"] = {"shape": [], "dtype": "str"}
    return schema


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"a value of type {type(value).__name__}"


def _check_value(key: str, value: Any, spec: dict[str, Any]) -> None:
    """Raise ObservationError unless `value` matches the schema entry `spec` of `key`."""
    if spec["dtype"] == "str":
        if not isinstance(value, str):
            raise ObservationError(f"observation {key!r}: expected a str, got {_describe(value)}")
        return
    image = spec["dtype"] == "uint8"
    expected = (f"a uint8 array of shape (H, W, 3), 1 <= H, W <= {MAX_IMAGE_SIDE}" if image
                else f"a float array of shape {tuple(spec['shape'])}")
    ok = isinstance(value, np.ndarray) and value.ndim == len(spec["shape"])
    if ok and image:
        ok = value.dtype == np.uint8 and value.shape[2] == 3 and all(1 <= n <= MAX_IMAGE_SIDE for n in value.shape[:2])
    elif ok:
        ok = value.dtype.kind == "f" and list(value.shape) == spec["shape"]
    if not ok:
        raise ObservationError(f"observation {key!r}: expected {expected}, got {_describe(value)}")
    if not image and not np.all(np.isfinite(value)):
        raise ObservationError(f"observation {key!r}: expected finite values, got {value.tolist()}")


def _dataset_keys(obs: dict) -> dict:
    """openpi client keys (`observation/image`) -> the run's dataset keys (`image`)."""
    return {k.removeprefix(_OPENPI_PREFIX) if isinstance(k, str) else k: v for k, v in obs.items()}


class EnergyPolicy:
    """openpi BasePolicy shape around a loaded run. `inference` picks the method; without it the method
    is the run's `inference` section (`inference_from`), or gradient correction with `correction` when
    that is given (off when its steps are 0)."""

    run: LoadedRun
    correction: CorrectionConfig
    inference: InferenceConfig
    schema: dict[str, dict[str, Any]]
    metadata: dict

    def __init__(self, run: LoadedRun, correction: CorrectionConfig | None = None, *, seed: int = 0,
                 inference: InferenceConfig | None = None):
        self.run = run
        self.correction = correction_from(run) if correction is None else correction
        if inference is None:
            inference = inference_from(run, None if correction is None else "gradient", correction=self.correction)
        self.inference = inference
        self._inputs = Compose(tuple(run.transforms.inputs))
        self._outputs = Compose(tuple(run.transforms.outputs))
        self._key = jax.random.key(seed)
        self._calls = 0
        model = run.cfg.policy.model
        cameras = [k for k in (run.cfg.data.image_key, run.cfg.data.wrist_key) if k]  # [] = state-only
        self.schema = observation_schema(run)
        self.metadata = {
            "policy": "eqx_energy",
            "run": run.run_dir.name,  # the name only: a client has no business with the server's paths
            "step": run.step,
            "action_horizon": model.action_horizon,
            "action_dim": run.cfg.data.action_dim,
            "camera_keys": cameras,
            "observation_keys": list(self.schema),
            "observation_schema": self.schema,
            "correction": {"steps": self.correction.steps, "alpha": float(self.correction.alpha),
                           "clip_frac": float(self.correction.clip_frac), "first_only": self.correction.first_only},
            "inference": {"method": inference.method, "num_samples": inference.num_samples},
        }

    def infer(self, obs: dict) -> dict:
        """One observation -> {"actions": (h, action_dim) float32 in env units, "policy_timing"}."""
        reply = self.infer_batch([_dataset_keys(obs) if isinstance(obs, dict) else obs])
        return {"actions": reply["actions"][0], "policy_timing": reply["policy_timing"]}

    def infer_batch(self, observations: list[dict], perturb: Perturb | None = None) -> dict[str, Any]:
        """b observations in one call -> {"actions": (b, h, action_dim), "policy_timing": {...}} (oracle: and
        "candidates", (b, n, h, action_dim))."""
        if not observations:
            raise ValueError("infer_batch needs at least one observation; got an empty list")
        observations = [self.check_observation(obs) for obs in observations]  # before any transform
        start = time.monotonic()
        examples = [model_inputs(self._inputs(obs)) for obs in observations]
        batch = jax.tree.map(lambda *xs: np.stack(xs), *examples)
        key = jax.random.fold_in(self._key, self._calls)
        self._calls += 1
        policy, energy = self.run.model.policy, self.run.model.energy
        obs = Observation.from_dict(batch)
        candidates, context, mask, _ = propose(policy, energy, key, obs, self.inference, self.run.cfg.policy.sample_steps)
        candidates = jax.block_until_ready(candidates)
        sampled = time.monotonic()
        if perturb is not None:
            ad = energy.action_dim
            moved = [perturb(np.asarray(candidates[:, i, :, :ad])) for i in range(candidates.shape[1])]
            candidates = candidates.at[..., :ad].set(np.stack(moved, axis=1).astype(np.float32))
        timing = {"sample_ms": (sampled - start) * 1000}
        corrected = time.monotonic()
        actions = jax.block_until_ready(decide(energy, context, candidates, mask, self.inference)[0])
        timing["correction_ms"] = (time.monotonic() - corrected) * 1000
        reply = {"actions": self._env_actions(batch["state"], actions)}
        if self.inference.method == "oracle":
            reply["candidates"] = np.stack([self._env_actions(batch["state"], c) for c in np.moveaxis(np.asarray(candidates), 1, 0)], 1)
        timing["infer_ms"] = (time.monotonic() - start) * 1000
        return {**reply, "policy_timing": timing}

    def _env_actions(self, states: np.ndarray, padded: Any) -> np.ndarray:
        """Normalized padded chunks (b, h, p) -> checked env-unit actions (b, h, action_dim)."""
        padded = np.asarray(padded)
        out = [self._outputs({"state": states[i], "actions": padded[i]})["actions"] for i in range(len(padded))]
        return self.check_actions(np.stack(out).astype(np.float32), len(padded))

    def check_observation(self, obs: Any) -> dict:
        """`obs` cut to the schema's keys, once every one matches (else ObservationError)."""
        if not isinstance(obs, dict):
            raise ObservationError(f"an observation must be a dict with the keys {list(self.schema)}; "
                                   f"got {_describe(obs)}")
        missing = [k for k in self.schema if k not in obs]
        if missing:
            raise ObservationError(f"observation is missing {missing}: expected the keys {list(self.schema)} "
                                   f"(metadata['observation_schema']), got {reprlib.repr(sorted(map(str, obs)))}")
        for key, spec in self.schema.items():
            _check_value(key, obs[key], spec)
        return {k: obs[k] for k in self.schema}

    def check_actions(self, actions: np.ndarray, b: int) -> np.ndarray:
        """`actions` when they are finite and (b, h, action_dim), else ActionError (never sent to a robot)."""
        expected = (b, self.run.cfg.policy.model.action_horizon, self.run.cfg.data.action_dim)
        if actions.shape != expected:
            raise ActionError(f"the policy computed actions of shape {actions.shape}, expected (b, h, action_dim) = "
                              f"{expected}; the run's transforms do not fit its config")
        bad = np.flatnonzero(~np.isfinite(actions).all(axis=(1, 2)))
        if bad.size:
            raise ActionError(f"the policy computed non-finite actions for observation(s) {bad.tolist()} of {b}; "
                              "refusing to return them")
        return actions


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


def inference_from(run: LoadedRun, method: str | None = None, *, num_samples: int | None = None,
                   margin: float | None = None, guide_scale: float | None = None, schedule: str | None = None,
                   query: str | None = None, correction: CorrectionConfig | None = None) -> InferenceConfig:
    """The run's `inference` section as an InferenceConfig, the given fields replaced (None keeps the run's
    value; `correction` None is the run's `correction_from(run)`). Gradient with 0 steps is "off"; off and
    gradient draw one candidate."""
    settings = run.cfg.inference
    method = settings.method if method is None else method
    correction = correction_from(run) if correction is None else correction
    if method == "gradient" and correction.steps == 0:
        method = "off"
    if method in ("off", "gradient"):
        return InferenceConfig(method=method, correction=correction if method == "gradient" else None)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    guidance = None
    if method == "guided":
        guidance = GuidanceConfig(scale=pick(guide_scale, settings.guide_scale), schedule=pick(schedule, settings.schedule),
                                  query=pick(query, settings.query))
    return InferenceConfig(method=method, num_samples=pick(num_samples, settings.num_samples),
                           selection=SelectionConfig(margin=pick(margin, settings.margin)), guidance=guidance)
