"""A small deterministic policy that needs no checkpoint: for exercising the server, clients and benchmarks.

Features f = [state ; mean_rgb(image_1)/255 ; ... ] (one 3-vector per camera), actions
a = reshape(MLP_actor(f), (h, a)). With `correction_steps > 0` it then refines them as the real
policy does, a <- a - alpha * dE/da for E(f, a) = MLP_energy([f ; vec(a)]), and reports that
share of the time. The reply has openpi's shape: {"actions" (h, a) float32, "state",
"policy_timing": {"infer_ms", "correction_ms" (only when correcting)}}. Observations use
LIBERO's keys by default ("observation/state", "observation/image", "observation/wrist_image").
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Shaped

from eqx_energy._typing import Actions, Scalar

Features = Float[Array, "c"]


class ToyNet(eqx.Module):
    """Actor and energy MLPs over the observation features (width c = state dims + 3 per camera)."""

    actor: eqx.nn.MLP
    energy: eqx.nn.MLP
    horizon: int = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)

    def __init__(self, feature_dim: int, horizon: int, action_dim: int, width: int, *, key: Array):
        actor_key, energy_key = jax.random.split(key)
        self.actor = eqx.nn.MLP(feature_dim, horizon * action_dim, width, depth=2, key=actor_key)
        self.energy = eqx.nn.MLP(feature_dim + horizon * action_dim, "scalar", width, depth=2, key=energy_key)
        self.horizon = horizon
        self.action_dim = action_dim

    def features(self, state: Float[Array, "_"], images: tuple[Shaped[Array, "_ _ 3"], ...]) -> Features:
        """[state ; per-camera mean RGB in [0, 1]]."""
        means = [jnp.mean(image.astype(jnp.float32), axis=(0, 1)) / 255.0 for image in images]
        return jnp.concatenate([state, *means])

    def actions(self, features: Features) -> Actions:
        return self.actor(features).reshape(self.horizon, self.action_dim)

    def energy_value(self, features: Features, actions: Actions) -> Scalar:
        return self.energy(jnp.concatenate([features, actions.reshape(-1)]))


@eqx.filter_jit
def _sample(net: ToyNet, state: Float[Array, "_"], images: tuple[Array, ...]) -> tuple[Features, Actions]:
    features = net.features(state, images)
    return features, net.actions(features)


@eqx.filter_jit
def _correct(net: ToyNet, features: Features, actions: Actions, alpha: Scalar, steps: int) -> Actions:
    grad = jax.grad(net.energy_value, argnums=1)

    def body(a: Actions, _: None) -> tuple[Actions, None]:
        return a - alpha * grad(features, a), None

    return jax.lax.scan(body, actions, None, length=steps)[0]


class ToyPolicy:
    """openpi BasePolicy shape (`infer`, `metadata`) around a `ToyNet`; deterministic (no sampling noise)."""

    net: ToyNet
    state_key: str
    image_keys: tuple[str, ...]
    correction_steps: int
    alpha: float
    metadata: dict

    def __init__(
        self,
        *,
        state_dim: int = 8,
        state_key: str = "observation/state",
        image_keys: tuple[str, ...] = ("observation/image", "observation/wrist_image"),
        horizon: int = 10,
        action_dim: int = 7,
        width: int = 64,
        correction_steps: int = 0,
        alpha: float = 0.1,
        key: Array,
    ):
        if correction_steps < 0:
            raise ValueError(f"correction_steps must be >= 0 (0 = no correction); got {correction_steps}")
        self.net = ToyNet(state_dim + 3 * len(image_keys), horizon, action_dim, width, key=key)
        self.state_key = state_key
        self.image_keys = tuple(image_keys)
        self.correction_steps = correction_steps
        self.alpha = alpha
        self.metadata = {"policy": "toy", "action_horizon": horizon, "action_dim": action_dim}

    def infer(self, obs: dict) -> dict:
        """obs -> {"actions": (h, a) float32, "state", "policy_timing"}; raises ValueError on a bad obs
        (missing key, wrong state shape, non-finite state, an image that is not uint8 (H, W, 3))."""
        state, images = self._read(obs)
        start = time.monotonic()
        features, actions = _sample(self.net, jnp.asarray(state), tuple(jnp.asarray(im) for im in images))
        actions = jax.block_until_ready(actions)
        sampled = time.monotonic()
        timing = {}
        if self.correction_steps:
            actions = _correct(self.net, features, actions, jnp.asarray(self.alpha), self.correction_steps)
            actions = jax.block_until_ready(actions)
            timing["correction_ms"] = (time.monotonic() - sampled) * 1000
        timing["infer_ms"] = (time.monotonic() - start) * 1000
        return {"actions": np.asarray(actions), "state": obs[self.state_key], "policy_timing": timing}

    def _read(self, obs: dict) -> tuple[np.ndarray, list[np.ndarray]]:
        missing = [k for k in (self.state_key, *self.image_keys) if k not in obs]
        if missing:
            raise ValueError(f"observation lacks keys {missing}; got keys {sorted(obs)}")
        state = np.asarray(obs[self.state_key], dtype=np.float32)
        state_dim = self.net.actor.in_size - 3 * len(self.image_keys)
        if state.shape != (state_dim,):
            raise ValueError(f"{self.state_key!r} must have shape ({state_dim},); got {state.shape}")
        if not np.isfinite(state).all():  # NaN in, NaN actions out: a robot would execute them
            raise ValueError(f"{self.state_key!r} must be finite; got {state.tolist()}")
        images = [np.asarray(obs[k]) for k in self.image_keys]
        for k, image in zip(self.image_keys, images):
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise ValueError(f"{k!r} must be a uint8 (H, W, 3) image; got {image.dtype} {image.shape}")
        return state, images
