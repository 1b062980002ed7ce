"""EnergyPolicy's inference methods: served selection = in-process `infer` for the same key; oracle candidates."""

import jax
import numpy as np
import pytest

from eqx_energy.checkpoints.load_run import load_run
from eqx_energy.data.transforms import Compose
from eqx_energy.policy.energy_sampling import InferenceConfig, infer
from eqx_energy.policy.pi0 import Observation
from eqx_energy.serve.client import PolicyClient
from eqx_energy.serve.policy import EnergyPolicy
from eqx_energy.serve.server import PolicyServer
from eqx_energy.train.inputs import model_inputs

pytestmark = pytest.mark.slow  # trains a tiny run first


def _obs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "state": rng.normal(size=3).astype(np.float32), "prompt": "push the blue button"}


def test_served_selection_equals_in_process_and_oracle_returns_every_candidate(tiny_run):
    run = load_run(tiny_run[0])
    select = InferenceConfig(method="select", num_samples=3)
    server_policy = EnergyPolicy(run, seed=7, inference=select)
    with PolicyServer(server_policy, host="127.0.0.1", port=0).running() as port, PolicyClient("127.0.0.1", port) as client:
        assert client.metadata["inference"] == {"method": "select", "num_samples": 3}
        served = client.infer(_obs(0))["actions"]
    example = model_inputs(Compose(tuple(run.transforms.inputs))(_obs(0)))
    batch = jax.tree.map(lambda x: np.asarray(x)[None], example)
    key = jax.random.fold_in(jax.random.key(7), 0)  # the policy's first call
    chosen, candidates = infer(run.model.policy, run.model.energy, key, Observation.from_dict(batch), select,
                               run.cfg.policy.sample_steps)
    outputs = Compose(tuple(run.transforms.outputs))
    want = outputs({"state": batch["state"][0], "actions": np.asarray(chosen[0])})["actions"]
    np.testing.assert_allclose(served, want, rtol=1e-6, atol=1e-6)

    oracle = EnergyPolicy(run, seed=7, inference=InferenceConfig(method="oracle", num_samples=3)).infer_batch([_obs(0)])
    assert oracle["candidates"].shape == (1, 3, 4, 2)
    for i in range(3):
        env = outputs({"state": batch["state"][0], "actions": np.asarray(candidates[0, i])})["actions"]
        np.testing.assert_allclose(oracle["candidates"][0, i], env, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(oracle["actions"], oracle["candidates"][:, 0])


def test_the_runs_inference_section_is_what_serve_and_eval_sim_use_by_default(tiny_run):
    import dataclasses

    from eqx_energy.serve.policy import correction_from, inference_from
    from eqx_energy.sim.grid import inference_settings
    from eqx_energy.train.config import InferenceSettings

    run = load_run(tiny_run[0])
    assert EnergyPolicy(run).inference.method == "gradient"  # the default section: the seed's correction
    assert inference_from(run, correction=correction_from(run, steps=0)).method == "off"
    cfg = dataclasses.replace(run.cfg, inference=InferenceSettings(method="select", num_samples=3, margin=0.25, guide_scale=0.3))
    chosen = run._replace(cfg=cfg)
    policy = EnergyPolicy(chosen, seed=7)
    assert policy.metadata["inference"] == {"method": "select", "num_samples": 3}
    assert float(policy.inference.selection.margin) == 0.25
    np.testing.assert_array_equal(policy.infer(_obs(0))["actions"],
                                  EnergyPolicy(run, seed=7, inference=InferenceConfig(
                                      method="select", num_samples=3, selection=policy.inference.selection)).infer(_obs(0))["actions"])
    # a flag replaces one knob and keeps the rest; an explicit correction still means gradient correction
    assert inference_from(chosen, num_samples=5).num_samples == 5
    assert float(inference_from(chosen, "guided").guidance.scale) == pytest.approx(0.3)
    assert EnergyPolicy(chosen, correction_from(chosen, steps=2)).inference.method == "gradient"
    names = [s.name for s in inference_settings(chosen, ["off", "select", "guided"], [2], steps=[], alphas=[])]
    assert names == ["off", "select N=2", "guided N=2 lambda=0.3"]
