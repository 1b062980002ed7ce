"""ToyPolicy: features and actions against a numpy forward pass; correction against a step-by-step loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_energy.serve import ToyPolicy


def _obs() -> dict:
    rng = np.random.default_rng(0)
    return {
        "observation/image": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=5),
    }


def _numpy_mlp(mlp, x: np.ndarray) -> np.ndarray:
    for i, layer in enumerate(mlp.layers):
        x = np.asarray(layer.weight, np.float64) @ x + np.asarray(layer.bias, np.float64)
        if i < len(mlp.layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def test_actions_match_numpy_forward():
    policy = ToyPolicy(state_dim=5, horizon=3, action_dim=2, width=8, key=jax.random.key(1))
    obs = _obs()
    reply = policy.infer(obs)
    features = np.concatenate(
        [obs["observation/state"]]
        + [obs[k].reshape(-1, 3).mean(axis=0) / 255.0 for k in ("observation/image", "observation/wrist_image")]
    )
    expected = _numpy_mlp(policy.net.actor, features).reshape(3, 2)
    assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (3, 2)
    np.testing.assert_allclose(reply["actions"], expected, rtol=1e-5, atol=1e-5)
    assert reply["state"] is obs["observation/state"]
    assert set(reply["policy_timing"]) == {"infer_ms"}


def test_correction_is_gradient_descent_on_the_energy():
    sizes = dict(state_dim=5, horizon=3, action_dim=2, width=8)
    base = ToyPolicy(**sizes, key=jax.random.key(1))
    corrected = ToyPolicy(**sizes, correction_steps=3, alpha=0.05, key=jax.random.key(1))
    obs = _obs()
    reply = corrected.infer(obs)
    net = corrected.net
    images = (jnp.asarray(obs["observation/image"]), jnp.asarray(obs["observation/wrist_image"]))
    features = net.features(jnp.asarray(obs["observation/state"], jnp.float32), images)
    a = jnp.asarray(base.infer(obs)["actions"])
    energies = [net.energy_value(features, a)]
    for _ in range(3):
        a = a - 0.05 * jax.grad(net.energy_value, argnums=1)(features, a)
        energies.append(net.energy_value(features, a))
    np.testing.assert_allclose(reply["actions"], np.asarray(a), rtol=1e-5, atol=1e-6)
    assert all(e1 < e0 for e0, e1 in zip(energies, energies[1:]))  # small steps descend
    assert set(reply["policy_timing"]) == {"infer_ms", "correction_ms"}


@pytest.mark.parametrize(
    "change, error",
    [
        ({"observation/wrist_image": None}, "lacks keys"),
        ({"observation/state": np.zeros(4)}, r"must have shape \(5,\)"),
        ({"observation/state": np.array([0.0, np.nan, 0.0, 0.0, 0.0])}, r"must be finite; got \[0.0, nan,"),
        ({"observation/image": np.zeros((6, 5, 3), np.float32)}, "must be a uint8"),
        ({"observation/image": np.zeros((6, 5), np.uint8)}, "must be a uint8"),
    ],
)
def test_bad_observations_raise(change, error):
    policy = ToyPolicy(state_dim=5, horizon=3, action_dim=2, width=8, key=jax.random.key(1))
    obs = {k: v for k, v in {**_obs(), **change}.items() if v is not None}
    with pytest.raises(ValueError, match=error):
        policy.infer(obs)


def test_negative_correction_steps_raise():
    with pytest.raises(ValueError, match="correction_steps must be >= 0"):
        ToyPolicy(correction_steps=-1, key=jax.random.key(0))
