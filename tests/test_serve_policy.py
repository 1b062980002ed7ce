"""EnergyPolicy behind a real PolicyServer: a round trip with the tiny trained run, correction on and off."""

import equinox as eqx
import numpy as np
import pytest

from eqx_energy.checkpoints.load_run import load_run
from eqx_energy.correct import CorrectionConfig
from eqx_energy.data.transforms import Unnormalize
from eqx_energy.serve.client import PolicyClient
from eqx_energy.serve.policy import ActionError, EnergyPolicy, ObservationError
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


CAMERA = {"shape": [None, None, 3], "dtype": "uint8"}
SCHEMA = {"image": CAMERA, "wrist_image": CAMERA, "state": {"shape": [3], "dtype": "float32"},
          "prompt": {"shape": [], "dtype": "str"}}


def test_round_trip_with_and_without_correction(run):
    on = EnergyPolicy(run, CorrectionConfig(steps=2, alpha=0.3), seed=0)
    off = EnergyPolicy(run, CorrectionConfig(steps=0), seed=0)
    with PolicyServer(on, host="127.0.0.1", port=0).running() as port, PolicyClient("127.0.0.1", port) as client:
        assert client.metadata["action_horizon"] == 4 and client.metadata["correction"]["steps"] == 2
        assert client.metadata["observation_schema"] == SCHEMA  # None (any image size) survives the wire
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


def test_metadata_publishes_the_schema_and_no_paths(run):
    metadata = EnergyPolicy(run).metadata
    assert metadata["observation_schema"] == SCHEMA and metadata["observation_keys"] == list(SCHEMA)
    assert metadata["run"] == run.run_dir.name and "run_dir" not in metadata
    assert str(run.run_dir.parent) not in repr(metadata)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"state": np.zeros(2, np.float32)}, r"'state': expected a float array of shape \(3,\), got an array of "
                                             r"dtype float32 and shape \(2,\)"),
        ({"state": np.zeros(5, np.float32)}, r"'state': expected .* shape \(3,\), got .* shape \(5,\)"),
        ({"state": np.array([0.0, np.nan, 1.0], np.float32)}, r"'state': expected finite values, got \[0.0, nan, 1.0\]"),
        ({"state": np.array([0.0, np.inf, 1.0])}, "'state': expected finite values"),
        ({"state": np.zeros(3, np.int32)}, r"'state': expected a float array .*, got an array of dtype int32"),
        ({"state": [0.0, 0.0, 0.0]}, "'state': expected a float array .*, got a value of type list"),
        ({"image": np.zeros((16, 16, 3), np.float32)}, r"'image': expected a uint8 array of shape \(H, W, 3\).*float32"),
        ({"wrist_image": np.zeros((3, 16, 16), np.uint8)}, r"'wrist_image': .*got .* shape \(3, 16, 16\)"),
        ({"image": np.zeros((0, 16, 3), np.uint8)}, r"'image': expected .* \(H, W, 3\), 1 <= H, W <= 4096"),
        ({"image": np.zeros((16, 16), np.uint8)}, "'image': expected a uint8 array"),
        ({"prompt": b"push"}, "'prompt': expected a str, got a value of type bytes"),
    ],
)
def test_observation_contract_violations_are_refused_before_any_transform(run, change, match):
    """Before: a 2-dim state was normalized with the first 2 stats and answered, a NaN state with NaN actions."""
    obs = {**_obs(4), **change}
    with pytest.raises(ObservationError, match=match):
        EnergyPolicy(run).infer(obs)
    with pytest.raises(ObservationError, match=match):  # openpi's prefixed keys are checked as the dataset's
        EnergyPolicy(run).infer({(k if k == "prompt" else f"observation/{k}"): v for k, v in obs.items()})


def test_missing_keys_are_refused(run):
    obs = _obs(4)
    del obs["prompt"], obs["wrist_image"]
    with pytest.raises(ObservationError, match=r"missing \['wrist_image', 'prompt'\]: expected the keys \['image', "
                                               r"'wrist_image', 'state', 'prompt'\] .*got \['image', 'state'\]"):
        EnergyPolicy(run).infer(obs)


def test_extra_keys_and_float64_state_are_accepted(run):
    """openpi's LIBERO client sends a float64 state; keys outside the schema never reach the transforms."""
    obs = _obs(5)
    loose = {**obs, "state": obs["state"].astype(np.float64), "actions": np.full((4, 2), np.nan, np.float32),
             "episode_index": 3, b"raw": 1}
    expected = EnergyPolicy(run, CorrectionConfig(steps=0), seed=0).infer(obs)["actions"]
    got = EnergyPolicy(run, CorrectionConfig(steps=0), seed=0).infer(loose)["actions"]
    np.testing.assert_array_equal(got, expected)


def test_non_finite_actions_are_never_returned(run):
    def nan_row_1(chunk):
        out = np.array(chunk)
        out[1] = np.nan
        return out

    with pytest.raises(ActionError, match=r"non-finite actions for observation\(s\) \[1\] of 2"):
        EnergyPolicy(run, CorrectionConfig(steps=0)).infer_batch([_obs(0), _obs(1)], perturb=nan_row_1)
    with pytest.raises(eqx.EquinoxRuntimeError, match="actions to correct are non-finite"):  # correct's error_if
        EnergyPolicy(run, CorrectionConfig(steps=2)).infer_batch([_obs(0), _obs(1)], perturb=nan_row_1)
    policy = EnergyPolicy(run)
    good = np.zeros((2, 4, 2), np.float32)
    assert policy.check_actions(good, 2) is good
    with pytest.raises(ActionError, match=r"shape \(2, 4, 3\), expected \(b, h, action_dim\) = \(2, 4, 2\)"):
        policy.check_actions(np.zeros((2, 4, 3), np.float32), 2)


def test_server_answers_a_nan_state_with_an_error_and_keeps_serving(run):
    with PolicyServer(EnergyPolicy(run), host="127.0.0.1", port=0).running() as port, \
            PolicyClient("127.0.0.1", port) as client:
        with pytest.raises(RuntimeError, match="ObservationError: observation 'state': expected finite values"):
            client.infer({**_obs(2), "state": np.array([np.nan, 0.0, 0.0], np.float32)})
        assert np.isfinite(client.infer(_obs(2))["actions"]).all()
