"""EnergyPolicy behind a real PolicyServer: a round trip with the tiny trained run, correction on and off."""

import numpy as np
import pytest

from eqx_energy.checkpoints.load_run import load_run
from eqx_energy.correct import CorrectionConfig
from eqx_energy.data.transforms import Unnormalize
from eqx_energy.serve.client import PolicyClient
from eqx_energy.serve.policy import EnergyPolicy
from eqx_energy.serve.server import PolicyServer

pytestmark = pytest.mark.slow  # trains a tiny run first


@pytest.fixture(scope="module")
def run(tiny_run):
    run_dir, _ = tiny_run
    return load_run(run_dir)


def _obs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "state": rng.normal(size=3).astype(np.float32), "prompt": "push the blue button"}


def test_round_trip_with_and_without_correction(run):
    on = EnergyPolicy(run, CorrectionConfig(steps=2, alpha=0.3), seed=0)
    off = EnergyPolicy(run, CorrectionConfig(steps=0), seed=0)
    with PolicyServer(on, host="127.0.0.1", port=0).running() as port, PolicyClient("127.0.0.1", port) as client:
        assert client.metadata["action_horizon"] == 4 and client.metadata["correction"]["steps"] == 2
        reply = client.infer(_obs(0))
    assert reply["actions"].shape == (4, 2) and reply["actions"].dtype == np.float32
    assert {"infer_ms", "correction_ms"} <= set(reply["policy_timing"]) and "server_timing" in reply
    assert reply["policy_timing"]["correction_ms"] > 0
    base = off.infer(_obs(0))  # same seed, first call: the same sampled chunk before correction
    assert base["policy_timing"]["correction_ms"] < reply["policy_timing"]["correction_ms"]
    assert not np.allclose(base["actions"], reply["actions"])
    # unnormalized: the perturbation hook with a known shift moves env actions by shift * std
    stats = run.norm_stats["actions"]
    shifted = EnergyPolicy(run, CorrectionConfig(steps=0), seed=0).infer_batch([_obs(0)], perturb=lambda a: a + 1.0)
    np.testing.assert_allclose(shifted["actions"][0] - base["actions"], np.broadcast_to(stats.std + 1e-6, (4, 2)),
                               rtol=1e-4, atol=1e-5)
    assert Unnormalize in {type(t) for t in run.transforms.outputs}


def test_bad_observation_is_reported_to_the_client(run):
    with PolicyServer(EnergyPolicy(run), host="127.0.0.1", port=0).running() as port:
        with PolicyClient("127.0.0.1", port) as client, pytest.raises(RuntimeError, match="prompt"):
            client.infer({"state": np.zeros(3, np.float32)})
        with PolicyClient("127.0.0.1", port) as client:  # the server keeps serving
            assert client.infer(_obs(1))["actions"].shape == (4, 2)


def test_openpi_client_keys_are_accepted(run):
    """openpi's LIBERO client sends observation/<key>: same actions as the dataset keys."""
    obs = _obs(3)
    openpi_obs = {("prompt" if k == "prompt" else f"observation/{k}"): v for k, v in obs.items()}
    plain = EnergyPolicy(run, CorrectionConfig(steps=0), seed=0).infer(obs)
    prefixed = EnergyPolicy(run, CorrectionConfig(steps=0), seed=0).infer(openpi_obs)
    np.testing.assert_array_equal(plain["actions"], prefixed["actions"])
