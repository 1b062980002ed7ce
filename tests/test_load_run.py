"""load_run serves the model training trained: the frozen half rebuilt with training's key
derivation and dtype, the trainable half from the checkpoint (EMA), per mode; the config comes from
the checkpoint (not config.yaml) and the optimizer state is never read."""

import dataclasses
import logging
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_loop import tiny_config, write_tiny_dataset

from eqx_energy.checkpoints.load_run import load_run
from eqx_energy.checkpoints.run import RunCheckpoints
from eqx_energy.train.model import build_model, is_inexact, run_keys
from eqx_energy.train import loop
from eqx_energy.train.config import TrainConfig, from_dict, to_dict, write_config

pytestmark = pytest.mark.slow  # trains: one compile of the step per mode, or the shared tiny run


def array_leaves(tree) -> dict[str, np.ndarray]:
    """path -> host copy of every array leaf."""
    flat = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    return {jax.tree_util.keystr(path): np.array(x) for path, x in flat}


def differing_leaves(a, b) -> list[str]:
    """Paths whose arrays differ in presence, dtype or bits ([] = equal leaf for leaf)."""
    a, b = array_leaves(a), array_leaves(b)
    return [k for k in sorted(a.keys() | b.keys())
            if k not in a or k not in b or a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_lerobot"))


@pytest.mark.parametrize("mode", ["energy_only", "monitor"])
def test_served_model_equals_the_trained_model(mode, dataset, tmp_path, monkeypatch):
    """Record the frozen half and the state the real train step saw (2 steps, seed 3; energy_only with
    a bf16 frozen policy); load_run's model must equal combine(EMA after the last step, frozen), leaf for leaf.
    (joint, which has no frozen arrays: test_joint_served_model_is_the_saved_ema.)"""
    seen = {}
    real_make = loop.make_train_step

    def recording_make(*args, **kwargs):
        step = real_make(*args, **kwargs)

        def recorded(frozen, state, batch, key):
            state, metrics = step(frozen, state, batch, key)
            seen["frozen"], seen["ema"] = jax.tree.map(lambda x: np.array(x) if eqx.is_array(x) else x,
                                                       (frozen, state.ema))  # host copies
            return state, metrics

        return recorded

    monkeypatch.setattr(loop, "make_train_step", recording_make)
    cfg = tiny_config(dataset, mode=mode, steps=2, seed=3)
    if mode == "energy_only":
        cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, frozen_dtype="bfloat16"))
    loop.run(cfg, tmp_path, progress=False)
    run = load_run(tmp_path)
    assert run.step == 2 and run.ema and run.cfg == cfg
    trained = eqx.combine(seen["ema"], seen["frozen"])
    assert differing_leaves(run.model, trained) == []
    if mode == "energy_only":
        floats = {x.dtype for x in array_leaves(run.model.policy).values() if jnp.issubdtype(x.dtype, jnp.floating)}
        assert floats == {jnp.dtype(jnp.bfloat16)}


def test_config_from_the_checkpoint_and_no_optimizer_state(tiny_run, tmp_path, caplog):
    """A config.yaml rewritten after training does not change what load_run builds; a checkpoint whose
    opt_state is gone still loads (it is never read); a checkpoint without a saved config (never
    written by train.py) falls back to config.yaml with a warning."""
    run_dir, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with RunCheckpoints(run_dir) as checkpoints:
        saved = from_dict(TrainConfig, checkpoints.restore().config)
    wrong = dataclasses.replace(saved, energy=dataclasses.replace(saved.energy, hidden=24))
    write_config(wrong, copy / "config.yaml")
    shutil.rmtree(copy / "checkpoints" / "2" / "opt_state")
    loaded, reference = load_run(copy), load_run(run_dir)
    assert loaded.cfg == saved and to_dict(loaded.cfg) != to_dict(wrong)
    assert differing_leaves(loaded.model, reference.model) == []
    write_config(saved, copy / "config.yaml")
    shutil.rmtree(copy / "checkpoints" / "2" / "config")
    with caplog.at_level(logging.WARNING, logger="eqx_energy.checkpoints.load_run"):
        assert differing_leaves(load_run(copy).model, reference.model) == []
    assert "no saved config" in caplog.text


def test_joint_served_model_is_the_saved_ema(tiny_run):
    """joint trains every float leaf, so nothing is frozen: the served model is the EMA the last
    checkpoint saved, read here with templates from the model's own shapes (not load_run's)."""
    run_dir, _ = tiny_run
    run = load_run(run_dir)
    assert run.cfg.train.mode == "joint" and run.ema
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = eqx.filter(eqx.filter_eval_shape(build_model, run.cfg, run_keys(0)[0]), is_inexact)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    with RunCheckpoints(run_dir) as checkpoints:
        saved = checkpoints.restore(ema=template).ema
    assert not jax.tree.leaves(eqx.filter(run.model, lambda x: eqx.is_array(x) and not is_inexact(x)))
    assert differing_leaves(eqx.filter(run.model, eqx.is_array), saved) == []
