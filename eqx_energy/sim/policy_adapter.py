"""A trained run as `evaluate()`'s batched policy: in process (EnergyPolicy.infer_batch) or over the websocket.

    adapter = SimPolicy(load_run("runs/metaworld_energy"), correction, seed=0)
    evaluate(adapter, tasks, episodes, act=adapter.act, render_images=True, ...)

In process, noise goes in before correction (DESIGN: sample -> add noise -> correct -> unnormalize ->
clip -> execute): `adapter.act` draws eps_i ~ N(0, I_(h x a)) from episode i's generator (the same
draws `noise_after_policy` would make) and adds sigma * eps_i / u to the sampled chunk in the model's
normalized space, where u = unnormalize(1) - unnormalize(0) per action dim. Unnormalization is affine,
so without correction the executed chunk is exactly policy + sigma * eps in env units, as for the
scripted expert; with correction the energy sees the noisy chunk and moves it.

With an `InferenceConfig` the adapter runs any method (off, gradient, select, guided); the oracle
method also needs `oracle`, a reference policy_fn (the scripted expert): of the n candidates (noise
included) it executes the one whose first action is nearest the reference's first action in env units,
after the clip to [-1, 1] that execution applies. Only the first action: `ExpertPolicy` has no
look-ahead (it repeats the current action), so later steps of its chunk are not the expert's plan.
`calls` and `infer_ms` add up the policy's own time per call (the oracle's reference not included).

`client_policy_fn(client)` drives a PolicyServer one observation per request (openpi's client loop);
the server's policy owns correction, and noise can only be added after it (`noise_after_policy`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

from eqx_energy.checkpoints.load_run import LoadedRun
from eqx_energy.correct import CorrectionConfig
from eqx_energy.data.transforms import Compose
from eqx_energy.policy.energy_sampling import InferenceConfig
from eqx_energy.serve.client import PolicyClient
from eqx_energy.serve.policy import EnergyPolicy
from eqx_energy.sim.evaluate import Observation, PolicyFn


def env_units_per_normalized(run: LoadedRun) -> Float[np.ndarray, " a"]:
    """u: how far one normalized unit moves each env action dim, through the run's own output transforms."""
    model_dim, action_dim = run.cfg.policy.model.action_dim, run.cfg.data.action_dim
    state = np.zeros(model_dim, np.float32)
    outputs = Compose(tuple(run.transforms.outputs))
    ends = [outputs({"state": state, "actions": np.full((1, model_dim), v, np.float32)})["actions"][0, :action_dim]
            for v in (0.0, 1.0)]
    return (ends[1] - ends[0]).astype(np.float32)


class SimPolicy:
    """evaluate()'s policy_fn (obs list -> (b, h, a) env-space chunks) with the noise-before-correction `act` hook."""

    policy: EnergyPolicy
    calls: int
    infer_ms: float

    def __init__(self, run: LoadedRun, correction: CorrectionConfig | None = None, *, seed: int = 0,
                 inference: InferenceConfig | None = None, oracle: PolicyFn | None = None):
        self.policy = EnergyPolicy(run, correction, seed=seed, inference=inference)
        if (self.policy.inference.method == "oracle") != (oracle is not None):
            raise ValueError(f"SimPolicy: the oracle method needs `oracle` (a reference policy_fn such as ExpertPolicy) "
                             f"and no other method takes one; got method={self.policy.inference.method!r}, "
                             f"oracle={oracle!r}")
        self._oracle = oracle
        self._scale = 1.0 / env_units_per_normalized(run)
        self._noise: np.ndarray | None = None  # (rows, h, a) normalized noise for the next call, set by act
        self.calls, self.infer_ms = 0, 0.0

    def __call__(self, observations: list[Observation]) -> Float[np.ndarray, "b h a"]:
        noise, self._noise = self._noise, None
        perturb = None if noise is None else (lambda chunk: _add_rows(chunk, noise))
        reply = self.policy.infer_batch(observations, perturb)
        self.calls += 1
        self.infer_ms += reply["policy_timing"]["infer_ms"]
        if self._oracle is None:
            return reply["actions"]
        return nearest_candidate(reply["candidates"], np.asarray(self._oracle(observations), np.float32))

    def act(self, policy_fn: PolicyFn, observations: list[Observation], sigma: float,
            rngs: Sequence[np.random.Generator]) -> Float[np.ndarray, "b h a"]:
        """policy_fn(observations) with sigma * eps_i (env units) added to row i before correction."""
        if sigma > 0.0:
            model = self.policy.run.cfg.policy.model
            shape = (model.action_horizon, self._scale.shape[0])
            self._noise = np.stack([sigma * rng.standard_normal(shape) * self._scale for rng in rngs]).astype(np.float32)
        try:
            return np.asarray(policy_fn(observations), np.float32)
        finally:
            self._noise = None


def nearest_candidate(candidates: Float[np.ndarray, "b n h a"], reference: Float[np.ndarray, "b h a"]) -> Float[np.ndarray, "b h a"]:
    """Per row, the candidate whose first action, clipped to [-1, 1], is nearest (L2) the reference's first action."""
    distance = np.sum(np.square(np.clip(candidates[:, :, 0], -1.0, 1.0) - reference[:, None, 0]), axis=-1)
    return candidates[np.arange(len(candidates)), np.argmin(distance, axis=1)]


def _add_rows(chunk: Float[np.ndarray, "b h a"], noise: Float[np.ndarray, "r h a"]) -> Float[np.ndarray, "b h a"]:
    """chunk with noise added to its first r rows (the rest are evaluate()'s padding rows)."""
    if noise.shape[0] > chunk.shape[0] or noise.shape[1:] != chunk.shape[1:]:
        raise ValueError(f"noise for {noise.shape} does not fit the sampled chunk {chunk.shape}; the run's "
                         "action_horizon and data.action_dim must match the chunk")
    out = np.array(chunk, np.float32)
    out[: noise.shape[0]] += noise
    return out


def needs_images(metadata: dict) -> bool:
    """Whether a served policy reads cameras (an empty `camera_keys` = state-only; servers without it: yes)."""
    return bool(metadata.get("camera_keys", True))


def client_policy_fn(client: PolicyClient) -> PolicyFn:
    """evaluate()'s policy_fn over a websocket: one `client.infer(obs)` per observation, chunks stacked."""

    def policy_fn(observations: list[Observation]) -> Float[np.ndarray, "b h a"]:
        return np.stack([np.asarray(client.infer(obs)["actions"], np.float32) for obs in observations])

    return policy_fn
