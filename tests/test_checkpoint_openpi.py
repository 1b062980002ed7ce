"""openpi checkpoint layout: orbax round trips (bit-exact), the `value` level, dtype casts, errors, norm stats."""

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from eqx_energy.checkpoints.openpi import load_norm_stats, load_openpi_params, openpi_leaves, save_openpi_params
from eqx_energy.policy.pi0 import Pi0, Pi0Config, init_pi0
from eqx_energy.train.sharding import FSDP, fsdp_shardings, make_mesh


@pytest.fixture(scope="module", params=[False, True], ids=["pi0", "pi05"])
def tiny(request):
    cfg = Pi0Config.tiny(pi05=request.param)
    return cfg, init_pi0(cfg, key=jax.random.key(0))


def _bit_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _nested(flat):
    """{"a/b": x} -> {"a": {"b": x}}: a checkpoint tree written without the project's writer."""
    tree = {}
    for path, x in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = x
    return tree


@pytest.mark.parametrize("value_level", [False, True], ids=["released", "training"])
def test_round_trip_is_bit_exact(tiny, tmp_path, value_level):
    cfg, model = tiny
    save_openpi_params(model, tmp_path / "params", value_level=value_level)
    # the tree on disk is openpi's: {"params": {"PaliGemma": {"img": ..., "llm": ...}, "action_in_proj": ...}}
    tree = ocp.PyTreeCheckpointer().metadata(tmp_path / "params").item_metadata.tree
    assert set(tree) == {"params"} and "PaliGemma" in tree["params"]
    leaf = tree["params"]["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"]["w"]
    assert isinstance(leaf, dict) == value_level  # training checkpoints: {..., "w": {"value": array}}
    loaded = load_openpi_params(tmp_path / "params", cfg)
    assert eqx.tree_equal(jax.tree.structure(loaded), jax.tree.structure(model))
    assert _bit_equal(loaded, model)


def test_chunked_save_loads_bit_exact(tiny, tmp_path):
    """Arrays over `chunk_bytes` are stored in several chunks (a load then decodes one at a time); the values survive."""
    cfg, model = tiny
    save_openpi_params(model, tmp_path / "params", chunk_bytes=4096)
    meta = ocp.PyTreeCheckpointer().metadata(tmp_path / "params").item_metadata.tree["params"]
    table = meta["PaliGemma"]["llm"]["embedder"]["input_embedding"]
    assert math.prod(table.storage.chunk_shape) * 4 <= 4096 < math.prod(table.shape) * 4
    assert _bit_equal(load_openpi_params(tmp_path / "params", cfg), model)


def test_bf16_checkpoint_stays_bf16_or_casts(tiny, tmp_path):
    cfg, model = tiny
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model)
    save_openpi_params(bf16, tmp_path / "params")
    kept = load_openpi_params(tmp_path / "params", cfg)
    assert {x.dtype for x in jax.tree.leaves(kept)} == {jnp.dtype(jnp.bfloat16)} and _bit_equal(kept, bf16)
    widened = load_openpi_params(tmp_path / "params", cfg, dtype="float32")
    assert _bit_equal(widened, jax.tree.map(lambda x: x.astype(jnp.float32), bf16))


@pytest.mark.parametrize("layout", [dict(use_ocdbt=False), dict(use_zarr3=True)], ids=["folder_per_array", "zarr3"])
def test_other_orbax_layouts_load(tiny, tmp_path, layout):
    """Older orbax checkpoints (no OCDBT: a folder per array) and zarr3 ones load bit-exact too."""
    cfg, model = tiny
    tree = {"params": _nested({k: np.asarray(v) for k, v in openpi_leaves(model).items()})}
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**layout)).save(tmp_path / "params", args=ocp.args.PyTreeSave(tree))
    assert _bit_equal(load_openpi_params(tmp_path / "params", cfg), model)


def test_fsdp_shardings_place_every_leaf_as_the_rule_says(tiny, tmp_path):
    """On a (data=4, fsdp=2) mesh of 8 CPU devices each leaf arrives in its rule's sharding and dtype, values as on one device."""
    cfg, model = tiny
    save_openpi_params(model, tmp_path / "params")
    template = eqx.filter_eval_shape(Pi0, cfg, key=jax.random.key(0))
    shardings = fsdp_shardings(template, make_mesh(4, 2), min_bytes=4096)
    rule = openpi_leaves(shardings)
    assert sum(FSDP in r.spec for r in rule.values()) >= 10  # the test must shard, not only replicate
    sharded = load_openpi_params(tmp_path / "params", cfg, dtype="bfloat16", shardings=shardings)
    single = openpi_leaves(load_openpi_params(tmp_path / "params", cfg, dtype="bfloat16"))
    for path, leaf in openpi_leaves(sharded).items():
        assert leaf.sharding == rule[path], path
        assert leaf.dtype == jnp.bfloat16 and np.array_equal(np.asarray(leaf), np.asarray(single[path])), path
        assert all(s.data.shape == rule[path].shard_shape(leaf.shape) for s in leaf.addressable_shards), path
    with pytest.raises(ValueError, match="no jax.sharding.Sharding for"):  # a tree of another config
        other = eqx.filter_eval_shape(Pi0, Pi0Config.tiny(pi05=not cfg.pi05), key=jax.random.key(0))
        load_openpi_params(tmp_path / "params", cfg, shardings=fsdp_shardings(other, make_mesh(4, 2)))


def test_extra_keys_are_ignored(tiny, tmp_path):
    cfg, model = tiny
    leaves = {k: np.asarray(v) for k, v in openpi_leaves(model).items()}
    tree = _nested({**leaves, "energy_model/head/kernel": np.ones((3, 1), np.float32)})
    ocp.PyTreeCheckpointer().save(tmp_path / "params", {"params": tree})
    assert _bit_equal(load_openpi_params(tmp_path / "params", cfg), model)


def test_wrong_config_names_first_bad_path(tiny, tmp_path):
    cfg, model = tiny
    save_openpi_params(model, tmp_path / "params")
    other = Pi0Config.tiny(pi05=not cfg.pi05)
    with pytest.raises(ValueError, match="is missing"):
        load_openpi_params(tmp_path / "params", other)
    with pytest.raises(ValueError, match=r"'PaliGemma/img/pos_embedding' has shape \(1, 16, 64\), expected \(1, 64, 64\)"):
        load_openpi_params(tmp_path / "params", Pi0Config.tiny(pi05=cfg.pi05, image_resolution=128))
    with pytest.raises(FileNotFoundError, match="<checkpoint>/params"):
        load_openpi_params(tmp_path / "nope", cfg)


def test_norm_stats_found_in_checkpoint_assets(tmp_path):
    stats = {"norm_stats": {"state": {"mean": [0.0, 1.0], "std": [1.0, 2.0], "q01": None, "q99": None}}}
    folder = tmp_path / "ckpt" / "assets" / "physical-intelligence" / "libero"
    folder.mkdir(parents=True)
    (folder / "norm_stats.json").write_text(json.dumps(stats))
    loaded = load_norm_stats(tmp_path / "ckpt")
    np.testing.assert_array_equal(loaded["state"].std, [1.0, 2.0])
    assert loaded["state"].q01 is None


def test_state_only_policy_loads_the_language_and_action_leaves_of_a_camera_checkpoint(tiny, tmp_path):
    """A state-only config (no cameras) reads everything but SigLIP from a full checkpoint, bit-exact."""
    cfg, model = tiny
    save_openpi_params(model, tmp_path / "params")
    state_only = load_openpi_params(tmp_path / "params", Pi0Config.tiny(pi05=cfg.pi05, image_keys=()))
    assert state_only.img is None
    assert not any(p.startswith("PaliGemma/img") for p in openpi_leaves(state_only))
    assert _bit_equal(state_only, eqx.tree_at(lambda m: m.img, model, None, is_leaf=lambda x: x is None))
