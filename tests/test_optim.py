"""Per-group AdamW: state only for trainable leaves, schedules, warm-steps delay, EMA, skip guard."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqx_energy.train.config import OptimConfig
from eqx_energy.train.optim import (
    OptState,
    ema_update,
    group_labels,
    guarded_update,
    lr_schedule,
    make_optimizer,
)


class Container(eqx.Module):
    policy: eqx.nn.MLP
    energy: eqx.nn.MLP

    def __init__(self, *, key):
        kp, ke = jax.random.split(key)
        self.policy = eqx.nn.MLP(4, 4, width_size=8, depth=1, key=kp)
        self.energy = eqx.nn.MLP(4, 1, width_size=8, depth=1, key=ke)

    def __call__(self, x):
        return self.energy(self.policy(x))[0]


@eqx.filter_jit
def make_container(key):
    return Container(key=key)  # one compiled init instead of many eager ops


def split(model, mode):
    spec = jax.tree.map(lambda _: False, model)
    if mode == "energy_only":
        spec = eqx.tree_at(lambda m: m.energy, spec, replace=jax.tree.map(eqx.is_inexact_array, model.energy))
    else:
        spec = jax.tree.map(eqx.is_inexact_array, model)
    return eqx.partition(model, spec)


def loss_fn(trainable, frozen, x):
    model = eqx.combine(trainable, frozen)
    return jnp.mean(jax.vmap(model)(x) ** 2)


def sizes(tree):
    return sorted(x.size for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x))


def test_state_only_for_trainable_leaves_and_frozen_untouched(key):
    model = make_container(key)
    trainable, frozen = split(model, "energy_only")
    params = eqx.filter(trainable, eqx.is_inexact_array)
    labels = group_labels(params)
    assert set(jax.tree.leaves(labels)) == {"energy"}
    opt = make_optimizer(OptimConfig(warmup_steps=0), labels, total_steps=10)
    state = opt.init(params)
    energy_sizes = sizes(model.energy)
    # Adam's mu and nu per energy leaf, nothing for the policy.
    assert sizes(state) == sorted(energy_sizes * 2)
    x = jnp.ones((4, 4))
    frozen_before = jax.tree.map(np.asarray, eqx.filter(frozen, eqx.is_array))

    @eqx.filter_jit
    def step(trainable, state):
        grads = eqx.filter_grad(loss_fn)(trainable, frozen, x)
        updates, state = opt.update(grads, state, eqx.filter(trainable, eqx.is_inexact_array))
        return eqx.apply_updates(trainable, updates), state

    for _ in range(3):
        trainable, state = step(trainable, state)
    assert int(state.count) == 3
    assert trainable.policy.layers[0].weight is None
    for a, b in zip(
        jax.tree.leaves(frozen_before), jax.tree.leaves(eqx.filter(frozen, eqx.is_array)), strict=True
    ):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert not np.array_equal(
        np.asarray(trainable.energy.layers[0].weight), np.asarray(model.energy.layers[0].weight)
    )


def test_joint_groups_have_own_lr(key):
    model = make_container(key)
    params = eqx.filter(model, eqx.is_inexact_array)
    labels = group_labels(params)
    assert labels.policy.layers[0].weight == "policy" and labels.energy.layers[1].bias == "energy"
    cfg = OptimConfig(energy_lr=1e-2, policy_lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0)
    opt = make_optimizer(cfg, labels, total_steps=10)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = eqx.filter_jit(opt.update)(grads, state, params)
    # First Adam step with a constant gradient moves every entry by -lr (bias-corrected m / sqrt(v) = 1),
    # then global-norm clipping has scaled g but Adam is scale-invariant up to eps.
    np.testing.assert_allclose(np.asarray(updates.energy.layers[0].weight), -1e-2, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(updates.policy.layers[0].weight), -1e-4, rtol=1e-4)
    lrs = opt.learning_rates(state)
    assert set(lrs) == {"energy", "policy"}
    np.testing.assert_allclose([float(lrs["energy"]), float(lrs["policy"])], [1e-2, 1e-4], rtol=1e-6)


def test_schedule_values():
    cfg = OptimConfig(warmup_steps=4, decay_steps=14, min_lr_ratio=0.1)
    sched = lr_schedule(cfg, 1.0, total_steps=999)
    expected = {n: (n + 1) / 5 for n in range(4)}
    for n in (4, 6, 9, 14, 20):
        t = min(n - 4, 10) / 10
        expected[n] = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    for n, value in expected.items():
        np.testing.assert_allclose(float(sched(n)), value, rtol=1e-6, err_msg=f"step {n}")
    # decay_steps None -> the run's length; constant schedule; no warmup.
    np.testing.assert_allclose(float(lr_schedule(OptimConfig(warmup_steps=0), 2.0, 10)(10)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(lr_schedule(OptimConfig(warmup_steps=0), 2.0, 10)(0)), 2.0, rtol=1e-6)
    const = lr_schedule(OptimConfig(warmup_steps=1, schedule="constant"), 2.0, 10)
    np.testing.assert_allclose([float(const(n)) for n in (0, 1, 50)], [1.0, 2.0, 2.0], rtol=1e-6)
    with pytest.raises(ValueError, match="must exceed optim.warmup_steps"):
        lr_schedule(OptimConfig(warmup_steps=10), 1.0, total_steps=10)


def test_energy_warm_steps_delay(key):
    model = make_container(key)
    params = eqx.filter(model, eqx.is_inexact_array)
    cfg = OptimConfig(energy_lr=0.1, policy_lr=0.01, warmup_steps=2, decay_steps=20)
    opt = make_optimizer(cfg, group_labels(params), total_steps=20, energy_warm_steps=3)
    state = opt.init(params)
    sched = lr_schedule(cfg, 0.1, 20)
    jit_update = eqx.filter_jit(opt.update)
    grads = jax.tree.map(jnp.ones_like, params)
    for n in range(5):
        lrs = opt.learning_rates(state)
        expected_energy = 0.0 if n < 3 else float(sched(n - 3))
        np.testing.assert_allclose(float(lrs["energy"]), expected_energy, rtol=1e-6)
        np.testing.assert_allclose(float(lrs["policy"]), float(lr_schedule(cfg, 0.01, 20)(n)), rtol=1e-6)
        updates, state = jit_update(grads, state, params)
        energy_moves = any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates.energy))
        assert energy_moves == (n >= 3), n
        assert all(np.all(np.asarray(u) != 0) for u in jax.tree.leaves(updates.policy.layers[0]))
    # The energy Adam state counted only the 2 updates after the delay.
    energy_state = state.inner.inner_states["energy"].inner_state
    assert int(energy_state.count) == 5
    counts = [int(x) for x in jax.tree.leaves(energy_state.inner) if x.dtype == jnp.int32]
    assert counts and set(counts) == {2}


def test_ema_math():
    ema = {"w": jnp.array([1.0, 2.0]), "n": None}
    params = {"w": jnp.array([3.0, -2.0]), "n": None}
    out = ema_update(ema, params, 0.9)
    np.testing.assert_allclose(np.asarray(out["w"]), [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
    ref = optax.incremental_update(params["w"], ema["w"], step_size=0.1)
    np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(ref), rtol=1e-6)


def tree_bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree) if eqx.is_array(x)]


def test_non_finite_update_skipped_and_counted(key):
    model = make_container(key)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt = make_optimizer(OptimConfig(warmup_steps=0), group_labels(params), total_steps=10)
    step = eqx.filter_jit(functools.partial(guarded_update, opt, ema_decay=0.9))
    grads = jax.tree.map(jnp.ones_like, params)
    one = jnp.float32(1.0)
    state = step(grads, opt.init(params), params, loss=one, skipped=jnp.int32(0), ema=params)
    assert bool(state.finite) and int(state.skipped) == 0 and int(state.opt_state.count) == 1

    def poisoned(value):
        weight = grads.energy.layers[0].weight.at[0, 0].set(value)
        return eqx.tree_at(lambda p: p.energy.layers[0].weight, grads, weight)

    cases = {"loss": (grads, jnp.float32(jnp.nan)), "grad_nan": (poisoned(jnp.nan), one)}
    cases["grad_inf"] = (poisoned(jnp.inf), one)
    for n, (name, (bad_grads, loss)) in enumerate(cases.items(), start=1):
        out = step(bad_grads, state.opt_state, state.params, loss=loss, skipped=state.skipped, ema=state.ema)
        assert not bool(out.finite) and int(out.skipped) == n, name
        assert tree_bits(out.params) == tree_bits(state.params), name
        assert tree_bits(out.opt_state) == tree_bits(state.opt_state), name
        assert tree_bits(out.ema) == tree_bits(state.ema), name
        state = step(grads, out.opt_state, out.params, loss=one, skipped=out.skipped, ema=out.ema)
        assert bool(state.finite) and int(state.skipped) == n and int(state.opt_state.count) == n + 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_guarded_update_equals_plain_update_and_ema(key):
    model = make_container(key)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt = make_optimizer(OptimConfig(warmup_steps=0), group_labels(params), total_steps=10)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

    @eqx.filter_jit
    def both(grads, state, params):
        zero = jnp.zeros((), jnp.int32)
        out = guarded_update(
            opt, grads, state, params, loss=jnp.float32(0), skipped=zero, ema=params, ema_decay=0.5
        )
        updates, ref_state = opt.update(grads, state, params)
        return out, eqx.apply_updates(params, updates), ref_state

    out, ref_params, ref_state = both(grads, state, params)
    assert tree_bits(out.params) == tree_bits(ref_params)
    assert tree_bits(out.opt_state) == tree_bits(ref_state)
    ref_ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, params, ref_params)
    assert tree_bits(out.ema) == tree_bits(ref_ema)
    assert isinstance(out.opt_state, OptState)


def test_bad_labels_and_ema_args(key):
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"labels must be in \('energy', 'policy'\), got \['head'\]"):
        make_optimizer(OptimConfig(), {"w": "head"}, total_steps=10_000)
    opt = make_optimizer(OptimConfig(warmup_steps=0), {"w": "energy"}, total_steps=10)
    with pytest.raises(ValueError, match="both ema and ema_decay"):
        guarded_update(
            opt,
            params,
            opt.init(params),
            params,
            loss=jnp.float32(0),
            skipped=jnp.zeros((), jnp.int32),
            ema=params,
        )
