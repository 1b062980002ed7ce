"""The train step over a partitioned RunModel: which leaves train and get gradients in each mode,
where the energy loss's gradient goes, the non-finite guard, and sharded == single-device."""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_train_loop import read_metrics, tiny_config, write_tiny_dataset

from eqx_energy.data.pipeline import make_pipeline
from eqx_energy.train import loop
from eqx_energy.checkpoints.run import RunCheckpoints, abstract
from eqx_energy.train.config import TrainConfig, from_dict
from eqx_energy.train.model import build_model, init_model, trainable_spec
from eqx_energy.train.optim import group_labels, make_optimizer
from eqx_energy.train.sharding import FSDP, fsdp_shardings, init_sharded, make_mesh, shard_batch
from eqx_energy.train.step import _loss, init_state, make_train_step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, model, three real batches from the pipeline), shared by every test here."""
    root = write_tiny_dataset(tmp_path_factory.mktemp("tiny_lerobot"))
    cfg = tiny_config(root)
    run_dir = tmp_path_factory.mktemp("run")
    source, transforms, _ = loop.build_inputs(cfg, run_dir)
    pipeline = make_pipeline(source, loop.Compose((*transforms.inputs, loop.model_inputs)),
                             batch_size=cfg.data.batch_size, seed=0)
    it = iter(pipeline)
    batches = [jax.tree.map(np.asarray, next(it)) for _ in range(3)]
    return cfg, fresh_model(cfg), batches


def fresh_model(cfg):
    """`build_model(cfg, key 0)` on the default device, under one jit (built eagerly, every random op
    would compile on its own)."""
    one_device = make_mesh(1, 1, devices=jax.devices()[:1])
    return init_sharded(functools.partial(build_model, cfg), jax.random.key(0), mesh=one_device)


def snapshot(tree):
    """Host copies of every array leaf (the step donates its state)."""
    return [np.array(x) for x in jax.tree.leaves(tree)]


def bit_equal(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b))


# init_state under jit: run eagerly, its copies and the optimizer's zeros compile once per leaf shape
fresh_state = eqx.filter_jit(init_state)

_STEPS = {}  # mode -> (optimizer, jitted step): compiled once per mode for this module's model


def make(cfg, model, mode):
    """(frozen, fresh state, step) for `mode`. The state holds copies of the trainable arrays
    (init_state's): the step donates its state, and the module's model must survive for the next test."""
    trainable, frozen = eqx.partition(model, trainable_spec(model, mode))
    params = eqx.filter(trainable, eqx.is_inexact_array)
    if mode not in _STEPS:
        optimizer = make_optimizer(cfg.optim, group_labels(params), total_steps=cfg.train.steps)
        _STEPS[mode] = optimizer, make_train_step(optimizer, mode=mode, loss_cfg=cfg.loss, ema_decay=0.9)
    optimizer, step = _STEPS[mode]
    # committed to device 0 like the step's outputs, so the second call does not compile again
    return frozen, jax.device_put(fresh_state(trainable, optimizer, ema=True), jax.devices()[0]), step


MODES = {"energy_only": ("energy_only", False), "monitor": ("monitor", False),
         "joint_off": ("joint", False), "joint_on": ("joint", True)}


@pytest.fixture(scope="module")
def grads(setup):
    """d loss / d (every inexact leaf of the model) for each mode, whatever the mode trains
    (one compiled function for all four)."""
    cfg, model, batches = setup

    @eqx.filter_jit
    def all_grads(model, batch, key):
        params, rest = eqx.partition(model, eqx.is_inexact_array)
        out = {}
        for name, (mode, to_backbone) in MODES.items():
            loss = functools.partial(_loss, mode=mode, loss_cfg=cfg.loss, grad_to_backbone=to_backbone)
            out[name] = eqx.filter_grad(lambda p, loss=loss: loss(p, rest, batch, key)[0])(params)
        return out

    return all_grads(model, batches[0], jax.random.key(1))


def nonzero(tree):
    return any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(tree))


def allclose(a, b, **kw):
    return all(np.allclose(x, y, **kw) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_energy_only_trains_and_stores_state_only_for_energy(setup):
    cfg, model, batches = setup
    frozen, state, step = make(cfg, model, "energy_only")
    assert jax.tree.leaves(state.params.policy) == []
    energy_sizes = sorted(x.size for x in jax.tree.leaves(state.params.energy))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    # Adam's mu and nu, one per energy leaf, and nothing of the policy's size
    assert sorted(x.size for x in moments) == sorted(energy_sizes * 2)
    policy_before = snapshot(frozen.policy)
    energy_before = snapshot(state.params.energy)
    for i, batch in enumerate(batches):
        state, metrics = step(frozen, state, batch, jax.random.key(i))
        assert np.isfinite(metrics["loss"]) and "flow_loss" not in metrics
    assert bit_equal(snapshot(frozen.policy), policy_before)
    assert not bit_equal(snapshot(state.params.energy), energy_before)
    assert int(state.step) == 3 and int(state.skipped) == 0


def test_nan_batch_skips_update_bit_identically(setup):
    cfg, model, batches = setup
    frozen, state, step = make(cfg, model, "energy_only")
    state, _ = step(frozen, state, batches[0], jax.random.key(0))
    before = snapshot((state.params, state.opt_state, state.ema))
    bad = {**batches[1], "actions": np.full_like(batches[1]["actions"], np.nan)}
    state, metrics = step(frozen, state, bad, jax.random.key(1))
    assert not np.isfinite(metrics["loss"])
    assert bit_equal(snapshot((state.params, state.opt_state, state.ema)), before)
    assert int(state.skipped) == 1 and int(metrics["skipped_steps"]) == 1
    state, metrics = step(frozen, state, batches[2], jax.random.key(2))
    assert np.isfinite(metrics["loss"]) and int(state.skipped) == 1
    assert not bit_equal(snapshot((state.params, state.opt_state, state.ema)), before)


@pytest.mark.slow  # compiles the policy's backward pass (or three sharded steps)
def test_energy_only_policy_gets_no_gradient(grads):
    g = grads["energy_only"]
    assert not nonzero(g.policy) and nonzero(g.energy)


@pytest.mark.slow  # compiles the policy's backward pass (or three sharded steps)
def test_monitor_energy_gets_no_gradient(setup, grads):
    """monitor: the flow loss trains the policy; the energy is only computed (and logged), and it is
    not among the trainable leaves, so it never changes."""
    g = grads["monitor"]
    assert nonzero(g.policy) and not nonzero(g.energy)
    _, model, _ = setup
    assert jax.tree.leaves(eqx.filter(model, trainable_spec(model, "monitor")).energy) == []


@pytest.mark.slow  # compiles the policy's backward pass (or three sharded steps)
def test_energy_grad_to_backbone_switch(grads):
    """joint: without the switch the policy's gradient is the flow loss's alone (== monitor's);
    with it the energy loss reaches the policy too. The energy's own gradient is the same either way."""
    monitor, off, on = grads["monitor"], grads["joint_off"], grads["joint_on"]
    # atol: the two graphs differ by a stop_gradient, so f32 sums reassociate (seen: 4e-6 on leaves of size 0.5)
    assert nonzero(off.energy) and allclose(off.energy, on.energy, rtol=1e-4, atol=1e-5)
    assert allclose(off.policy, monitor.policy, rtol=1e-4, atol=1e-6)
    diff = jax.tree.map(lambda a, b: a - b, on.policy, off.policy)
    assert max(float(jnp.max(jnp.abs(d))) for d in jax.tree.leaves(diff)) > 1e-6


def test_joint_run_moves_policy_and_energy(tiny_run):
    """joint, through the real loop (the tiny run's 2 steps): finite flow and energy losses, a positive lr
    for both groups, and saved params that differ from the initial ones in the policy and the energy."""
    run_dir, _ = tiny_run
    for record in read_metrics(run_dir):
        assert np.isfinite(record["flow_loss"]) and np.isfinite(record["energy/loss"])
        assert record["lr/energy"] > 0 and record["lr/policy"] > 0
    with RunCheckpoints(run_dir) as checkpoints:
        cfg = from_dict(TrainConfig, checkpoints.restore().config)
        initial, _ = init_model(cfg, make_mesh(*cfg.train.mesh))  # the run's own init (values don't depend on the mesh)
        initial = eqx.filter(initial, eqx.is_inexact_array)
        saved = checkpoints.restore(params=abstract(initial)).params
    assert not bit_equal(snapshot(saved.policy), snapshot(initial.policy))
    assert not bit_equal(snapshot(saved.energy), snapshot(initial.energy))


MIN_BYTES = 16 * 1024  # small enough that the tiny model's larger leaves are FSDP-sharded


def place(tree, mesh):
    shardings = fsdp_shardings(tree, mesh, min_bytes=MIN_BYTES)
    return jax.tree.map(lambda x, s: x if s is None else jax.device_put(x, s), tree, shardings,
                        is_leaf=lambda x: x is None)


@pytest.mark.slow  # compiles the policy's backward pass (here: one single-device and one sharded step)
def test_sharded_step_equals_single_device(setup):
    """energy_only (FSDP-sharded frozen backbone, batch split over data and fsdp) on a (4, 2) mesh
    gives the single-device step's losses and Adam moments after two steps, and every state leaf keeps
    its sharding. (Parameters
    are not compared: Adam's first updates are lr * g / (|g| + eps), so an entry with g ~ eps flips
    sign under a different reduction order.)"""
    cfg, model, batches = setup

    def two_steps(mesh):
        frozen, state, step = make(cfg, model, "energy_only")
        if mesh is not None:
            frozen, state = place(frozen, mesh), place(state, mesh)
        layout = [x.sharding for x in jax.tree.leaves(state)]
        out = []
        for i in range(2):
            batch = batches[i] if mesh is None else shard_batch(batches[i], mesh)
            state, metrics = step(frozen, state, batch, jax.random.key(i))
            out.append(float(metrics["loss"]))
            # the state keeps its layout (else the next step would compile again)
            assert [x.sharding for x in jax.tree.leaves(state)] == layout
        return out, snapshot(state.opt_state)

    ref_loss, ref_params = two_steps(None)  # f32 matmuls in f32 (the CPU's only precision): the step compiled above
    loss, params = two_steps(make_mesh(4, 2))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(params, ref_params, strict=True):
        # f32 reductions split over devices sum in another order: 1e-4 of the leaf's scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b), initial=1e-3)))


def test_parameter_layout_follows_mesh_rules(setup):
    """On a (4, 2) mesh: leaves of >= MIN_BYTES split over fsdp on their largest axis divisible by 2,
    everything smaller replicated; each device then holds half of a sharded leaf."""
    _, model, _ = setup
    mesh = make_mesh(4, 2)
    placed = place(eqx.filter(model, eqx.is_array), mesh)
    sharded = 0
    for leaf in jax.tree.leaves(placed):
        spec = leaf.sharding.spec
        divisible = [i for i, n in enumerate(leaf.shape) if n % 2 == 0]
        if leaf.nbytes >= MIN_BYTES and divisible:
            axis = max(divisible, key=lambda i: leaf.shape[i])
            assert spec[axis] == FSDP and leaf.shape[axis] == max(leaf.shape[i] for i in divisible)
            assert leaf.addressable_shards[0].data.shape[axis] == leaf.shape[axis] // 2
            sharded += 1
        else:
            assert spec == P() or all(s is None for s in spec)
    assert sharded > 0


# ------------------------------------------------------------------ policy-sample losses (issue 12)


def policy_loss_config(cfg, **loss):
    """cfg with loss.kind policy_softmax over 4 policy samples of 2 flow steps (cheap to compile)."""
    fields = {"kind": "policy_softmax", "num_policy_samples": 4, "policy_sample_steps": 2, "beta": 1.0, **loss}
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **fields))


@pytest.mark.slow  # 30 steps, each sampling the policy (90 s on the shared 2-core machine)
def test_policy_softmax_energy_only_step_lowers_loss(setup):
    """energy_only with policy samples drawn in the step: only the energy moves (log_tau with it,
    when learned), and 30 steps on one batch, fresh samples each step, lower the loss."""
    cfg, _, batches = setup
    cfg = policy_loss_config(cfg, learn_tau=True)
    model = fresh_model(cfg)
    trainable, frozen = eqx.partition(model, trainable_spec(model, "energy_only"))
    params = eqx.filter(trainable, eqx.is_inexact_array)
    labels = group_labels(params)
    assert labels.energy.log_tau == "energy"
    optimizer = make_optimizer(cfg.optim, labels, total_steps=30)
    step = make_train_step(optimizer, mode="energy_only", loss_cfg=cfg.loss)
    state = jax.device_put(fresh_state(trainable, optimizer, ema=False), jax.devices()[0])  # committed: one compile
    policy_before = snapshot(frozen.policy)
    losses = []
    for i in range(30):
        state, metrics = step(frozen, state, batches[0], jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert {"energy/select_agreement", "energy/select_mse", "energy/sample_mse"} <= set(metrics)
    assert float(metrics["energy/tau"]) != pytest.approx(cfg.loss.tau)
    assert bit_equal(snapshot(frozen.policy), policy_before)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.slow  # compiles the policy's backward pass
def test_joint_policy_samples_give_the_policy_no_gradient(setup, grads):
    """joint mode draws the current policy's samples under stop_gradient: with the context stopped
    too, the policy's gradient is the flow loss's alone (== monitor's, whose flow loss draws the same
    noise and time from the same key whatever the energy loss), and the energy's is nonzero."""
    cfg, model, batches = setup
    loss = functools.partial(_loss, mode="joint", loss_cfg=policy_loss_config(cfg).loss, grad_to_backbone=False)

    @eqx.filter_jit
    def joint_grads(model, batch, key):
        params, rest = eqx.partition(model, eqx.is_inexact_array)
        return eqx.filter_grad(lambda p: loss(p, rest, batch, key)[0])(params)

    g = joint_grads(model, batches[0], jax.random.key(1))  # the batch and key of `grads`
    assert nonzero(g.energy)
    assert allclose(g.policy, grads["monitor"].policy, rtol=1e-4, atol=1e-6)
