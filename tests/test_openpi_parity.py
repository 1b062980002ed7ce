"""Parity with openpi's own JAX code on its dummy-width models (../shared/tools/openpi_parity).

Reads the fixtures that `make_fixture.sh OPENPI_GIT_DIR OUT_DIR` writes (openpi's params as a released
checkpoint, fixed inputs and openpi's outputs in f32 and bf16) from the folder in OPENPI_PARITY_DIR;
skipped without it (CI has no openpi). For each key: rel = ||ours - openpi|| / ||openpi|| over the valid
tokens. f32 must match to 1e-5; bf16 is judged against openpi's own f32-vs-bf16 gap for that key.

    OPENPI_PARITY_DIR=/path/to/out python -m pytest -q -s tests/test_openpi_parity.py
"""

import json
import os
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_energy.checkpoints.openpi import load_norm_stats, load_openpi_params
from eqx_energy.policy.pi0 import IMAGE_KEYS, Observation, Pi0Config

FIXTURES = os.environ.get("OPENPI_PARITY_DIR")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FIXTURES, reason="set OPENPI_PARITY_DIR to make_fixture.sh's output folder"),
]
BF16_GAP_RATIO = 1.5  # ours-vs-openpi in bf16, at most this times openpi's own f32-vs-bf16 difference


def _rel(ours, ref, valid=None):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if valid is not None:
        ours, ref = ours[valid], ref[valid]
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _outputs(fixture: pathlib.Path, pi05: bool, precision: str, ref) -> dict[str, np.ndarray]:
    """Our model on the fixture's inputs, in openpi's key names and layouts."""
    dtype = {"f32": "float32", "bf16": "bfloat16"}[precision]
    cfg = Pi0Config.dummy(pi05=pi05, dtype=dtype)
    pi0 = load_openpi_params(fixture / "params", cfg, dtype=dtype)  # openpi casts every leaf for bf16 inference
    obs = Observation(
        images={k: jnp.asarray(ref[f"inputs.image.{k}"]) for k in IMAGE_KEYS},
        image_masks={k: jnp.asarray(ref[f"inputs.image_mask.{k}"]) for k in IMAGE_KEYS},
        state=jnp.asarray(ref["inputs.state"]),
        tokenized_prompt=jnp.asarray(ref["inputs.tokenized_prompt"]),
        tokenized_prompt_mask=jnp.asarray(ref["inputs.tokenized_prompt_mask"]),
    )
    loss_key = jax.random.wrap_key_data(jnp.asarray(ref["inputs.loss_rng_key_data"]))
    sample_key = jax.random.wrap_key_data(jnp.asarray(ref["inputs.sample_rng_key_data"]))
    noise = jnp.asarray(ref["inputs.sample_noise"])
    tokens, mask, ar = eqx.filter_jit(lambda m, o: m.embed_prefix(o))(pi0, obs)
    prefix = eqx.filter_jit(lambda m, o: m.prefill(o))(pi0, obs)
    loss = eqx.filter_jit(lambda m, k, o, a: m.compute_loss(k, o, a))
    out = {
        "prefix_tokens": tokens, "prefix_mask": mask, "prefix_ar_mask": ar,
        "prefix_positions": jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, "prefix_out": prefix.features,
        "kv_cache_k": jnp.moveaxis(prefix.kv[0], 1, 0), "kv_cache_v": jnp.moveaxis(prefix.kv[1], 1, 0),  # (l b s k e)
        "loss": loss(pi0, loss_key, obs, jnp.asarray(ref["inputs.actions"])),
        "sample_actions": pi0.sample_actions(sample_key, obs, noise=noise)[0],
        "sample_actions_1step": pi0.sample_actions(sample_key, obs, 1, noise=noise)[0],
        "sample_actions_rng_noise": pi0.sample_actions(sample_key, obs)[0],
    }
    return {k: np.asarray(jnp.asarray(v).astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v) for k, v in out.items()}


FLOAT_KEYS = ("prefix_tokens", "prefix_out", "kv_cache_k", "kv_cache_v", "loss", "sample_actions",
              "sample_actions_1step", "sample_actions_rng_noise")


@pytest.mark.parametrize("name", ["pi0_dummy", "pi05_dummy"])
def test_matches_openpi(name):
    fixture = pathlib.Path(FIXTURES) / name
    if not fixture.exists():
        pytest.skip(f"{fixture} not generated")
    ref = dict(np.load(fixture / "reference.npz"))
    manifest = json.loads((fixture / "manifest.json").read_text())
    stats = load_norm_stats(fixture)
    assert set(stats) == {"state", "actions"} and stats["state"].mean.shape == (8,)
    # the loss draws are openpi's: the same split and samplers give the same noise and time
    _, noise_key, time_key = jax.random.split(jax.random.wrap_key_data(jnp.asarray(ref["inputs.loss_rng_key_data"])), 3)
    np.testing.assert_array_equal(np.asarray(jax.random.normal(noise_key, ref["inputs.actions"].shape)), ref["derived.loss_noise"])
    np.testing.assert_allclose(np.asarray(jax.random.beta(time_key, 1.5, 1, (2,)) * 0.999 + 0.001), ref["derived.loss_time"], rtol=1e-6)

    rows = {}
    for precision in ("f32", "bf16"):
        ours = _outputs(fixture, manifest["pi0_config"]["pi05"], precision, ref)
        for k in ("prefix_mask", "prefix_ar_mask", "prefix_positions"):
            np.testing.assert_array_equal(ours[k], ref[f"{precision}.{k}"], err_msg=k)
        valid = ref[f"{precision}.prefix_mask"]
        for k in FLOAT_KEYS:
            # padding query rows of the prefix pass are uniform attention, not meaningful (fixture README)
            v = (valid if k in ("prefix_tokens", "prefix_out") else np.broadcast_to(valid[None], ref[f"f32.{k}"].shape[:3])
                 if k.startswith("kv_cache") else None)
            rows.setdefault(k, {})[precision] = _rel(ours[k], ref[f"{precision}.{k}"], v)
            if precision == "bf16":
                rows[k]["openpi_gap"] = _rel(ref[f"bf16.{k}"], ref[f"f32.{k}"], v)
    print(f"\n{name}: key, f32 rel err, bf16 rel err, openpi's f32-vs-bf16 gap, bf16 / gap")
    for k, r in rows.items():
        print(f"  {k:26s} {r['f32']:.2e} {r['bf16']:.2e} {r['openpi_gap']:.2e} {r['bf16'] / r['openpi_gap']:.2f}")
    for k, r in rows.items():
        assert r["f32"] <= 1e-5, (k, r)
        assert r["bf16"] <= BF16_GAP_RATIO * r["openpi_gap"], (k, r)
