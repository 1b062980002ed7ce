"""Run checkpoints: bit-exact round trip incl. the data iterator, keep-last-N, sharded restore, errors."""

import json
import os
import shutil

import equinox as eqx
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from eqx_energy.checkpoints.run import CheckpointError, RunCheckpoints, abstract, latest_step
from eqx_energy.train.config import OptimConfig
from eqx_energy.train.optim import group_labels, make_optimizer
from eqx_energy.train.sharding import fsdp_shardings, make_mesh


class Container(eqx.Module):
    policy: eqx.nn.Linear
    energy: eqx.nn.MLP

    def __init__(self, *, key):
        kp, ke = jax.random.split(key)
        self.policy = eqx.nn.Linear(3, 3, key=kp)
        self.energy = eqx.nn.MLP(8, 1, width_size=16, depth=1, key=ke)


@eqx.filter_jit
def make_state(key):
    model = Container(key=key)
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(lambda m: m.energy, spec, replace=jax.tree.map(eqx.is_inexact_array, model.energy))
    params = eqx.filter(eqx.partition(model, spec)[0], eqx.is_inexact_array)
    opt = make_optimizer(OptimConfig(warmup_steps=0), group_labels(params), total_steps=10)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    updates, state = opt.update(grads, state, params)  # non-trivial Adam moments and count
    params = eqx.apply_updates(params, updates)
    ema = jax.tree.map(lambda p: p * 0.5, params)
    return params, state, ema


def data_iter(n=64, batch=4):
    return iter(grain.MapDataset.range(n).shuffle(seed=3).batch(batch).to_iter_dataset())


def bits(tree):
    return [(np.asarray(x).dtype, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


CONFIG = {"train": {"steps": 10, "mesh": [-1, 1]}, "loss": {"tau": 0.5}}
NORM = {
    "actions": {
        "mean": np.array([0.5, -1.0], np.float32),
        "std": np.array([2.0, 3.0], np.float32),
        "q01": None,
    }
}


def test_round_trip_bit_exact_and_data_resumes(tmp_path, key):
    params, opt_state, ema = make_state(key)
    it = data_iter()
    for _ in range(3):
        next(it)
    ckpt = RunCheckpoints(tmp_path, keep=2)
    ckpt.save(
        7,
        params=params,
        opt_state=opt_state,
        ema=ema,
        skipped=jnp.int32(2),
        data_iter=it,
        config=CONFIG,
        norm_stats=NORM,
    )
    continued = [next(it) for _ in range(4)]  # the iterator moves on while the save finishes
    ckpt.close()
    assert latest_step(tmp_path) == 7

    fresh_params, fresh_state, fresh_ema = make_state(jax.random.key(9))  # other values, same structure
    new_it = data_iter()
    r = RunCheckpoints(tmp_path).restore(
        params=abstract(fresh_params),
        opt_state=abstract(fresh_state),
        ema=abstract(fresh_ema),
        data_iter=new_it,
    )
    assert r.step == 7 and r.skipped == 2
    assert bits(r.params) == bits(params)
    assert bits(r.opt_state) == bits(opt_state)
    assert bits(r.ema) == bits(ema)
    assert jax.tree.structure(r.opt_state) == jax.tree.structure(opt_state)
    assert r.config == CONFIG
    assert r.norm_stats == {"actions": {"mean": [0.5, -1.0], "std": [2.0, 3.0], "q01": None}}
    for expected in continued:
        np.testing.assert_array_equal(next(new_it), expected)


def test_optional_items_and_keep_last_n(tmp_path, key):
    params, opt_state, _ = make_state(key)
    with RunCheckpoints(tmp_path, keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, params=params, opt_state=opt_state, skipped=0, config=CONFIG)
        ckpt.wait()
        assert ckpt.steps == [3, 4]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]
    r = RunCheckpoints(tmp_path).restore(3, params=abstract(params), opt_state=abstract(opt_state))
    assert r.step == 3 and r.ema is None and r.norm_stats is None
    with pytest.raises(
        CheckpointError, match=r"checkpoints/4 is incomplete or from a different setup: missing ema"
    ):
        RunCheckpoints(tmp_path).restore(
            params=abstract(params), opt_state=abstract(opt_state), ema=abstract(params)
        )


def test_only_the_items_asked_for_are_read(tmp_path, key):
    """Inference restores the EMA alone: with the optimizer state's files gone it still loads (they
    are never opened), while a resume, which asks for them, is told they are missing."""
    params, opt_state, ema = make_state(key)
    with RunCheckpoints(tmp_path) as ckpt:
        ckpt.save(3, params=params, opt_state=opt_state, ema=ema, skipped=1, config=CONFIG)
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "opt_state")
    r = RunCheckpoints(tmp_path).restore(ema=abstract(ema))
    assert bits(r.ema) == bits(ema) and r.params is None and r.opt_state is None
    assert r.config == CONFIG and r.skipped == 1
    assert RunCheckpoints(tmp_path).restore().ema is None  # JSON items only
    with pytest.raises(CheckpointError, match=r"checkpoints/3 is incomplete or from a different setup: missing opt_state"):
        RunCheckpoints(tmp_path).restore(params=abstract(params), opt_state=abstract(opt_state))


def test_restore_onto_sharded_template(tmp_path, key):
    params, opt_state, _ = make_state(key)
    with RunCheckpoints(tmp_path) as ckpt:
        ckpt.save(5, params=params, opt_state=opt_state, skipped=0, config=CONFIG)
    mesh = make_mesh(2, 4)
    shardings = fsdp_shardings(params, mesh, min_bytes=0)
    template = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
    r = RunCheckpoints(tmp_path).restore(params=template, opt_state=abstract(opt_state))
    w = r.params.energy.layers[0].weight  # (16, 8): split on axis 0 over fsdp
    assert w.sharding == NamedSharding(mesh, P("fsdp", None))
    assert w.addressable_shards[0].data.shape == (4, 8)
    assert bits(r.params) == bits(params)


class Grown(eqx.Module):
    """`Container` after a release added optional parts: a submodule that is off (None) and an array
    that is None unless set."""

    policy: eqx.nn.Linear
    energy: eqx.nn.MLP
    pooling: eqx.nn.Linear | None
    extra: jax.Array | None = None


def test_checkpoint_from_before_an_optional_field_restores(tmp_path, key):
    """Orbax records None fields; a checkpoint saved before `pooling` existed still restores into
    today's tree with pooling off, bit for bit. A real array difference is a clear error."""
    params, opt_state, ema = make_state(key)
    with RunCheckpoints(tmp_path) as ckpt:
        ckpt.save(1, params=params, opt_state=opt_state, ema=ema, skipped=0, config=CONFIG)
    r = RunCheckpoints(tmp_path).restore(ema=abstract(Grown(ema.policy, ema.energy, None)))
    assert r.ema.pooling is None and bits(r.ema) == bits(ema)
    before = snapshot(tmp_path)
    larger = Grown(params.policy, params.energy, None, jnp.zeros(3))
    with pytest.raises(CheckpointError, match=r"checkpoints/1/params holds different arrays than this model: "
                       r"missing extra; unexpected none\. .*left untouched"):
        RunCheckpoints(tmp_path).restore(params=abstract(larger))
    assert snapshot(tmp_path) == before


def test_data_position_resumes_on_another_process_count(tmp_path, key):
    """A run saved by 2 processes (one grain file each) resumes in 1 process at the same global batch;
    positions that disagree are an error, not a guess."""
    from eqx_energy.data.pipeline import make_pipeline

    params, opt_state, _ = make_state(key)
    pipeline = lambda **shard: make_pipeline(list(range(40)), None, batch_size=4, seed=1, threads=0, **shard)  # noqa: E731
    procs = [iter(pipeline(shard_index=i, shard_count=2)) for i in range(2)]
    for it in procs:
        for _ in range(3):
            next(it)
    with RunCheckpoints(tmp_path) as ckpt:
        ckpt.save(3, params=params, opt_state=opt_state, skipped=0, config=CONFIG, data_iter=procs[0])
    data = tmp_path / "checkpoints" / "3" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text(json.dumps(procs[1].get_state(), indent=4))
    one = iter(pipeline())
    RunCheckpoints(tmp_path).restore(params=abstract(params), data_iter=one)
    for _ in range(2):
        np.testing.assert_array_equal(next(one), np.concatenate([next(procs[0]), next(procs[1])]))

    (data / "process_1-of-2.json").write_text(json.dumps(procs[1].get_state(), indent=4))  # now 2 batches ahead
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"no data position for process 0 of 1, and its 2 saved positions "
                       r"\(process_0-of-2.json, process_1-of-2.json\) are not one position to share"):
        RunCheckpoints(tmp_path).restore(params=abstract(params), data_iter=iter(pipeline()))
    assert snapshot(tmp_path) == before


def test_missing_checkpoint_errors(tmp_path, key):
    params, opt_state, _ = make_state(key)
    assert latest_step(tmp_path / "nowhere") is None
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints; nothing to resume from"):
        RunCheckpoints(tmp_path).restore(params=abstract(params), opt_state=abstract(opt_state))
    with RunCheckpoints(tmp_path) as ckpt:
        ckpt.save(2, params=params, opt_state=opt_state, skipped=0, config=CONFIG)
    with pytest.raises(CheckpointError, match=r"checkpoints/9 does not exist; available steps: \[2\]"):
        RunCheckpoints(tmp_path).restore(9, params=abstract(params), opt_state=abstract(opt_state))


def snapshot(root):
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


# A failed orbax restore can leave a background callback that fires on a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["arrays", "json"])
def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_deleted(tmp_path, key, damage):
    params, opt_state, _ = make_state(key)
    with RunCheckpoints(tmp_path) as ckpt:
        ckpt.save(1, params=params, opt_state=opt_state, skipped=0, config=CONFIG)
        ckpt.save(2, params=params, opt_state=opt_state, skipped=0, config=CONFIG)
    step_dir = tmp_path / "checkpoints" / "2"
    if damage == "arrays":
        chunks = [step_dir / "opt_state" / "d" / f for f in os.listdir(step_dir / "opt_state" / "d")]
        assert chunks
        for f in chunks:  # flip the bits of the second half of each data file
            data = bytearray(f.read_bytes())
            data[len(data) // 2 :] = bytes(b ^ 0x5A for b in data[len(data) // 2 :])
            f.write_bytes(bytes(data))
    else:
        assert (step_dir / "meta" / "metadata").is_file()
        (step_dir / "meta" / "metadata").write_text("{not json")
    before = snapshot(tmp_path)
    ckpt = RunCheckpoints(tmp_path)
    with pytest.raises(CheckpointError) as info:
        ckpt.restore(params=abstract(params), opt_state=abstract(opt_state))
    message = str(info.value)
    assert "\n" not in message
    assert f"checkpoint {step_dir} could not be read" in message and "left untouched" in message
    assert "available: [1, 2]" in message
    with pytest.raises(CheckpointError, match=r"checkpoints/2 already exists; not overwriting it"):
        ckpt.save(2, params=params, opt_state=opt_state, skipped=0, config=CONFIG)
    ckpt.close()
    assert snapshot(tmp_path) == before
    # The earlier step is still good.
    r = RunCheckpoints(tmp_path).restore(1, params=abstract(params), opt_state=abstract(opt_state))
    assert bits(r.params) == bits(params)


def test_interrupted_run_resumes_exactly(tmp_path, key):
    """Sharded toy training with EMA, warm-steps delay and a NaN batch: 3 steps + save + restore
    into fresh objects + 3 steps gives the same losses and state as 6 uninterrupted steps."""
    from eqx_energy.train.optim import guarded_update
    from eqx_energy.train.sharding import data_sharding, shard_batch

    mesh = make_mesh(2, 4)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(64, 8)).astype(np.float32)
    table[13] = np.nan  # the batch holding row 13 is skipped

    def batches():
        return iter(grain.MapDataset.source(table).shuffle(seed=1).batch(8).to_iter_dataset())

    model = eqx.filter_jit(lambda k: Container(key=k))(key)
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(lambda m: m.energy, spec, replace=jax.tree.map(eqx.is_inexact_array, model.energy))
    trainable, frozen = eqx.partition(model, spec)
    params = eqx.filter(trainable, eqx.is_inexact_array)
    opt = make_optimizer(
        OptimConfig(warmup_steps=1), group_labels(params), total_steps=6, energy_warm_steps=1
    )

    def init():  # what a fresh process builds before restoring
        params = eqx.filter(trainable, eqx.is_inexact_array)
        frozen = eqx.partition(model, spec)[1]
        place = lambda tree: jax.device_put(tree, fsdp_shardings(tree, mesh, min_bytes=0))  # noqa: E731
        frozen = eqx.combine(place(eqx.filter(frozen, eqx.is_array)), frozen)
        params = place(params)
        return frozen, opt, params, place(opt.init(params)), jax.tree.map(jnp.copy, params)

    @eqx.filter_jit
    def step(opt, frozen, params, opt_state, ema, skipped, x):
        x = eqx.filter_shard(x, data_sharding(mesh))

        def loss_fn(p):
            return jnp.mean(jax.vmap(eqx.combine(p, frozen).energy)(x) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        out = guarded_update(
            opt, grads, opt_state, params, loss=loss, skipped=skipped, ema=ema, ema_decay=0.9
        )
        return loss, out.params, out.opt_state, out.ema, out.skipped

    def run(state, it, n):
        frozen, opt, params, opt_state, ema, skipped = state
        losses = []
        for _ in range(n):
            loss, params, opt_state, ema, skipped = step(
                opt, frozen, params, opt_state, ema, skipped, shard_batch(next(it), mesh)
            )
            losses.append(np.asarray(loss))
        return (frozen, opt, params, opt_state, ema, skipped), losses

    zero = jnp.zeros((), jnp.int32)
    full_state, full_losses = run((*init(), zero), batches(), 6)
    assert int(full_state[-1]) == 1 and sum(np.isnan(full_losses)) == 1

    it = batches()
    state, first = run((*init(), zero), it, 3)
    _, _, params, opt_state, ema, skipped = state
    with RunCheckpoints(tmp_path) as ckpt:
        ckpt.save(
            3, params=params, opt_state=opt_state, ema=ema, skipped=skipped, data_iter=it, config=CONFIG
        )

    frozen, opt, params0, opt_state0, ema0 = init()  # a fresh "process"
    it = batches()
    r = RunCheckpoints(tmp_path).restore(
        params=abstract(params0), opt_state=abstract(opt_state0), ema=abstract(ema0), data_iter=it
    )
    state, second = run((frozen, opt, r.params, r.opt_state, r.ema, jnp.int32(r.skipped)), it, 3)
    np.testing.assert_array_equal(np.array(first + second), np.array(full_losses))
    for got, want in zip(state[2:], full_state[2:], strict=True):
        assert bits(got) == bits(want)
