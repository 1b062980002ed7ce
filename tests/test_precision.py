"""Precision as shipped, from a policy checkpoint stored in bf16: the frozen backbone in bf16; every
trained leaf (the energy head; the policy's master weights in joint and monitor mode), its gradient,
AdamW moments and EMA in f32, also when restored from a run checkpoint stored in bf16. A bf16-backbone
energy_only step and a correction on a bf16-backbone context stay close to the f32 ones."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_loop import tiny_config, write_tiny_dataset

from eqx_energy.checkpoints.openpi import cast_params, save_openpi_params
from eqx_energy.checkpoints.run import RunCheckpoints
from eqx_energy.correct import CorrectionConfig, correct
from eqx_energy.data.pipeline import make_pipeline
from eqx_energy.policy.pi0 import Observation, init_pi0
from eqx_energy.train import loop
from eqx_energy.train.sharding import make_mesh
from eqx_energy.train.step import _loss, make_train_step

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config whose policy checkpoint is a tiny Pi0 stored in bf16, two real batches)."""
    root = write_tiny_dataset(tmp_path_factory.mktemp("tiny_lerobot"))
    cfg = tiny_config(root)
    params = tmp_path_factory.mktemp("openpi") / "params"
    save_openpi_params(cast_params(init_pi0(cfg.policy.model, key=jax.random.key(0)), "bfloat16"), params)
    source, transforms, _ = loop.build_inputs(cfg, tmp_path_factory.mktemp("run"))
    pipeline = make_pipeline(source, loop.Compose((*transforms.inputs, loop.model_inputs)),
                             batch_size=cfg.data.batch_size, seed=0)
    it = iter(pipeline)
    batches = [jax.tree.map(np.asarray, next(it)) for _ in range(2)]
    return dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, checkpoint=str(params))), batches


def with_precision(cfg, mode, dtype):
    """cfg in `mode` with the backbone stored and computed in `dtype` (frozen_dtype and policy.model.dtype)."""
    policy = dataclasses.replace(cfg.policy, frozen_dtype=dtype, model=dataclasses.replace(cfg.policy.model, dtype=dtype))
    return dataclasses.replace(cfg, policy=policy, train=dataclasses.replace(cfg.train, mode=mode))


def float_dtypes(tree) -> set:
    arrays = jax.tree.leaves(eqx.filter(tree, lambda x: eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)))
    return {x.dtype for x in arrays if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("mode", ["energy_only", "joint", "monitor"])
def test_dtypes_per_mode(mode, setup, tmp_path):
    """Trained leaves, their gradients, AdamW moments and EMA are f32; the frozen backbone (energy_only)
    is bf16, a frozen energy (monitor) f32. The same after restoring a run checkpoint stored in bf16."""
    cfg, batches = setup
    cfg = with_precision(cfg, mode, "bfloat16")
    checkpoints = RunCheckpoints(tmp_path)
    frozen, state, _ = loop.start_state(cfg, make_mesh(), checkpoints)
    loss = lambda p, batch: _loss(p, frozen, batch, jax.random.key(0), mode=mode, loss_cfg=cfg.loss,  # noqa: E731
                                  grad_to_backbone=False)[0]
    grads = eqx.filter_eval_shape(eqx.filter_grad(loss), state.params, jax.tree.map(jnp.asarray, batches[0]))  # traced only
    trained = {"energy_only": ("energy",), "joint": ("policy", "energy"), "monitor": ("policy",)}[mode]
    for name in ("policy", "energy"):
        assert float_dtypes(getattr(state.params, name)) == ({F32} if name in trained else set())
        assert float_dtypes(getattr(grads, name)) == ({F32} if name in trained else set())
    assert float_dtypes(frozen.policy) == ({BF16} if mode == "energy_only" else set())
    assert float_dtypes(frozen.energy) == ({F32} if mode == "monitor" else set())
    assert float_dtypes(state.opt_state) == float_dtypes(state.ema) == {F32}

    bf16 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)  # noqa: E731
    checkpoints.save(1, params=bf16(state.params), opt_state=bf16(state.opt_state), ema=bf16(state.ema),
                     skipped=0, config={})
    checkpoints.wait()
    _, restored, _ = loop.start_state(cfg, make_mesh(), checkpoints)
    assert float_dtypes(restored.params) == float_dtypes(restored.opt_state) == float_dtypes(restored.ema) == {F32}
    for saved, back in zip(jax.tree.leaves(bf16(state.ema)), jax.tree.leaves(restored.ema), strict=True):
        np.testing.assert_array_equal(np.asarray(saved, np.float32), np.asarray(back))
    checkpoints.close()


@pytest.fixture(scope="module")
def energy_only_pair(setup, tmp_path_factory):
    """{dtype: (frozen, state, optimizer)} of energy_only runs from the same bf16 checkpoint, the backbone
    stored and computed in bf16 or f32 (the same weights, widened)."""
    cfg, _ = setup
    return {dtype: loop.start_state(with_precision(cfg, "energy_only", dtype), make_mesh(),
                                    RunCheckpoints(tmp_path_factory.mktemp(dtype)))
            for dtype in ("bfloat16", "float32")}


@pytest.mark.slow  # compiles the energy_only step twice (bf16 and f32 backbone)
def test_bf16_backbone_energy_only_step_matches_f32(setup, energy_only_pair):
    """One energy_only step with a bf16 backbone against the f32-backbone step on the same weights: the
    loss within 1e-3 relative (measured 3e-5); the gradient, read from Adam's moments (mu = 0.1 x the
    clipped gradient dominates), within 0.6 of their norm (measured ~0.3 per leaf: at init the energy is nearly flat,
    so the InfoNCE gradient is small beside the bf16 context's ~1% rounding); the updated energy params
    within 2 x the first lr of each other (Adam moves an entry by at most lr; a bf16 energy head would
    round its params by up to 4e-3)."""
    cfg, batches = setup
    results = {}
    for dtype, (frozen, state, optimizer) in energy_only_pair.items():
        step = make_train_step(optimizer, mode="energy_only", loss_cfg=cfg.loss, ema_decay=cfg.optim.ema_decay)
        state = jax.tree.map(jnp.copy, state)  # the step donates its state; the fixture's is shared
        results[dtype] = step(frozen, state, batches[0], jax.random.key(1))
    (new16, metrics16), (new32, metrics32) = results["bfloat16"], results["float32"]
    assert float(metrics16["loss"]) == pytest.approx(float(metrics32["loss"]), rel=1e-3)
    mu16, mu32 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(s.opt_state) if x.ndim]) for s in (new16, new32))
    assert np.linalg.norm(mu16 - mu32) <= 0.6 * np.linalg.norm(mu32)
    first_lr = float(metrics32["lr/energy"])
    for a, b in zip(jax.tree.leaves(new16.params), jax.tree.leaves(new32.params), strict=True):
        assert a.dtype == b.dtype == F32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2 * first_lr * 1.001)


def test_correction_on_a_bf16_backbone_context_matches_f32(setup, energy_only_pair):
    """correct() on the bf16 backbone's prefix features against the f32 backbone's: the energies along
    the way within 1e-2 relative (measured <= 0.6%), the actions' moves within 0.2 of their norm
    (measured 0.095)."""
    _, batches = setup
    obs = Observation.from_dict(batches[1])
    start = jnp.asarray(batches[1]["actions"])
    out = {}
    for dtype, (frozen, state, _) in energy_only_pair.items():
        context, mask = eqx.filter_jit(lambda p, o: p.prefix_features(o))(frozen.policy, obs)
        energy = eqx.combine(state.params, frozen).energy
        actions, trace = eqx.filter_jit(correct)(energy, context, start, mask, CorrectionConfig(steps=3, alpha=0.1))
        out[dtype] = np.asarray(actions - start), np.asarray(trace.energy)
    (move16, energy16), (move32, energy32) = out["bfloat16"], out["float32"]
    np.testing.assert_allclose(energy16, energy32, rtol=1e-2)
    assert np.linalg.norm(move32) > 0
    assert np.linalg.norm(move16 - move32) <= 0.2 * np.linalg.norm(move32)
