"""Pi0 / Pi0.5: openpi's parameter counts and tree, KV-cached sampling, masks, the flow loss."""

import functools
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqx_energy.checkpoints.openpi import leaf_table
from eqx_energy.policy.pi0 import Observation, Pi0, Pi0Config, count_params, init_pi0

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"


@functools.cache  # one per config for the whole module
def perturbed(cfg: Pi0Config, seed: int = 0) -> Pi0:
    """A tiny policy whose zero-initialised leaves (SigLIP head, norms, biases) are made non-zero (on the
    host: a jitted perturbation of every leaf took ~5 s to compile at -O0)."""
    rng = np.random.default_rng(seed + 1)
    noise = lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.normal(size=x.shape), x.dtype)  # noqa: E731
    return jax.tree.map(noise, init_pi0(cfg, key=jax.random.key(seed)))


def fake_obs(cfg: Pi0Config, b: int = 2, seed: int = 0) -> Observation:
    rng = np.random.default_rng(seed)
    r, l = cfg.image_resolution, cfg.max_token_len
    lengths = rng.integers(3, l, size=(b, 1))
    return Observation(
        images={k: jnp.asarray(rng.uniform(-1, 1, (b, r, r, 3)), jnp.float32) for k in cfg.image_keys},
        image_masks={k: jnp.asarray([True] * (b - 1) + [k != "right_wrist_0_rgb"]) for k in cfg.image_keys},
        state=jnp.asarray(rng.normal(size=(b, cfg.action_dim)), jnp.float32),
        tokenized_prompt=jnp.asarray(np.where(np.arange(l) < lengths, rng.integers(1, cfg.vocab_size, (b, l)), 0), jnp.int32),
        tokenized_prompt_mask=jnp.asarray(np.arange(l)[None] < lengths),
    )


@pytest.fixture(scope="module", params=[False, True], ids=["pi0", "pi05"])
def tiny(request):
    cfg = Pi0Config.tiny(pi05=request.param)
    return cfg, perturbed(cfg), fake_obs(cfg)


@pytest.mark.parametrize(
    "cfg, count",
    [(Pi0Config(), 3_238_048_528), (Pi0Config(pi05=True), 3_353_433_872), (Pi0Config.dummy(), 429_337_808)],
    ids=["pi0", "pi05", "dummy"],
)
def test_param_counts_match_openpi(cfg, count):
    assert count_params(eqx.filter_eval_shape(Pi0, cfg, key=jax.random.key(0))) == count


@pytest.mark.parametrize("pi05, listing", [(False, "openpi_pi0_tree.txt"), (True, "openpi_pi05_tree.txt")])
def test_param_tree_matches_openpi_listing(pi05, listing):
    lines = (REFERENCE / listing).read_text().splitlines()
    want = sorted(tuple(line.split("\t")) for line in lines if line.count("\t") == 2)
    got = [(p, str(s), d) for p, s, d in leaf_table(eqx.filter_eval_shape(Pi0, Pi0Config(pi05=pi05), key=jax.random.key(0)))]
    assert got == want


def test_kv_cached_sampling_equals_uncached(tiny):
    cfg, model, obs = tiny
    cached = model.sample_actions(jax.random.key(3), obs, 4)
    full = model.sample_actions(jax.random.key(3), obs, 4, kv_cache=False)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(cached[0]), np.asarray(full[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cached[1]), np.asarray(full[1]))
    assert cached[0].shape == (2, cfg.action_horizon, 32)
    assert cached[1].shape == (2, cfg.prefix_len, cfg.prefix_width) and cached[1].dtype == jnp.float32


def test_batched_candidates_equal_separate_calls_with_split_keys(tiny):
    """n candidates from one prefix pass = n plain calls, candidate i with key split(key, n)[i]."""
    cfg, model, obs = tiny
    key, n = jax.random.key(9), 3
    many, feats, mask = model.sample_actions(key, obs, 2, num_samples=n)
    assert many.shape == (2, n, cfg.action_horizon, 32)
    for i, k in enumerate(jax.random.split(key, n)):
        one, one_feats, one_mask = model.sample_actions(k, obs, 2)
        np.testing.assert_allclose(np.asarray(many[:, i]), np.asarray(one), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(feats), np.asarray(one_feats))
        np.testing.assert_array_equal(np.asarray(mask), np.asarray(one_mask))
    assert not np.allclose(np.asarray(many[:, 0]), np.asarray(many[:, 1]))
    with pytest.raises(ValueError, match="num_samples=3"):
        model.sample_actions(key, obs, 2, noise=jnp.zeros((2, cfg.action_horizon, 32)), num_samples=n)


def test_prefix_features_agree_across_entry_points(tiny):
    cfg, model, obs = tiny
    feats, mask = model.prefix_features(obs)
    _, s_feats, s_mask = model.sample_actions(jax.random.key(0), obs, 2)
    loss, l_feats, l_mask = eqx.filter_jit(lambda m, k, o, a: m.compute_loss_and_prefix(k, o, a))(
        model, jax.random.key(1), obs, jnp.zeros((2, cfg.action_horizon, 32))
    )
    valid = np.asarray(mask)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(s_mask))
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(l_mask))
    np.testing.assert_allclose(np.asarray(feats)[valid], np.asarray(s_feats)[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(feats)[valid], np.asarray(l_feats)[valid], rtol=1e-4, atol=1e-4)
    # layout: 3 cameras x tokens_per_image, then the prompt; example 1's right-wrist camera is masked out
    t = cfg.tokens_per_image
    assert valid[1, 2 * t : 3 * t].sum() == 0 and valid[0, : 3 * t].all()
    np.testing.assert_array_equal(valid[:, 3 * t :], np.asarray(obs.tokenized_prompt_mask))
    assert np.isfinite(np.asarray(loss)).all()


def test_masked_inputs_change_nothing(tiny):
    cfg, model, obs = tiny
    # example 1's masked camera gets new pixels; padded prompt slots get other token ids
    images = dict(obs.images)
    images["right_wrist_0_rgb"] = images["right_wrist_0_rgb"].at[1].set(0.5)
    tokens = jnp.where(obs.tokenized_prompt_mask, obs.tokenized_prompt, 7)
    other = Observation(images, obs.image_masks, obs.state, tokens, obs.tokenized_prompt_mask)
    a0, f0, m0 = model.sample_actions(jax.random.key(5), obs, 2)
    a1, f1, _ = model.sample_actions(jax.random.key(5), other, 2)
    valid = np.asarray(m0)
    np.testing.assert_allclose(np.asarray(a0), np.asarray(a1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(f0)[valid], np.asarray(f1)[valid], rtol=1e-5, atol=1e-6)


def test_flow_loss_finite_and_decreasing():
    cfg = Pi0Config.tiny()
    model, obs = perturbed(cfg), fake_obs(cfg, b=4)
    actions = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, cfg.action_horizon, 32)), jnp.float32)
    opt = optax.adam(3e-3)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, key):
        loss, grads = eqx.filter_value_and_grad(lambda m: jnp.mean(m.compute_loss(key, obs, actions)))(model)
        updates, state = opt.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    losses = []
    for _ in range(15):  # the same key each step: a fixed batch, noise and time
        model, state, loss = step(model, state, jax.random.key(0))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_augmented_loss_is_finite_and_differs():
    cfg = Pi0Config.tiny()
    model, obs = perturbed(cfg), fake_obs(cfg)
    actions = jnp.zeros((2, cfg.action_horizon, 32))
    loss = eqx.filter_jit(lambda m, k, train: m.compute_loss(k, obs, actions, train=train))
    plain, aug = loss(model, jax.random.key(0), False), loss(model, jax.random.key(0), True)
    assert np.isfinite(np.asarray(aug)).all() and not np.allclose(np.asarray(plain), np.asarray(aug))


def test_bad_observation_raises(tiny):
    cfg, model, obs = tiny
    small = {k: v[:, :32, :32] for k, v in obs.images.items()}
    with pytest.raises(ValueError, match="resize"):
        model.embed_prefix(Observation(small, obs.image_masks, obs.state, obs.tokenized_prompt, obs.tokenized_prompt_mask))
    with pytest.raises(ValueError, match="max_token_len"):
        model.embed_prefix(Observation(obs.images, obs.image_masks, obs.state, obs.tokenized_prompt[:, :4], obs.tokenized_prompt_mask[:, :4]))


def test_config_validation():
    assert Pi0Config().max_token_len == 48 and Pi0Config(pi05=True).max_token_len == 200
    with pytest.raises(ValueError, match="share depth"):
        Pi0Config(paligemma_variant="gemma_2b", action_expert_variant="dummy")
    with pytest.raises(ValueError, match="did you mean 'gemma_2b'"):
        Pi0Config(paligemma_variant="gemma2b")


@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_state_only_policy_equals_camera_policy_with_every_camera_masked(pi05):
    """image_keys=() drops SigLIP and the camera tokens: same prompt features and actions as a camera policy whose
    cameras are all masked out (positions count valid tokens only), with the same language/action weights."""
    cfg = Pi0Config.tiny(pi05=pi05)
    model, obs = perturbed(cfg), fake_obs(cfg)
    blind = eqx.tree_at(lambda o: o.image_masks, obs, {k: jnp.zeros_like(v) for k, v in obs.image_masks.items()})
    state_cfg = Pi0Config.tiny(pi05=pi05, image_keys=())
    fresh = init_pi0(state_cfg, key=jax.random.key(0))
    shared = lambda m: [getattr(m, f) for f in ("llm", "action_in_proj", "action_out_proj", "state_proj",  # noqa: E731
                                                 "action_time_mlp_in", "action_time_mlp_out", "time_mlp_in", "time_mlp_out")]
    state_only = eqx.tree_at(shared, fresh, shared(model), is_leaf=lambda x: x is None)
    state_obs = Observation({}, {}, obs.state, obs.tokenized_prompt, obs.tokenized_prompt_mask)
    assert state_cfg.prefix_len == cfg.max_token_len
    feats, mask = state_only.prefix_features(state_obs)
    ref_feats, ref_mask = model.prefix_features(blind)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(ref_mask)[:, -cfg.max_token_len :])
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(feats)[valid], np.asarray(ref_feats)[:, -cfg.max_token_len :][valid], rtol=1e-5, atol=1e-5)
    noise = jax.random.normal(jax.random.key(2), (2, cfg.action_horizon, cfg.action_dim))
    actions = state_only.sample_actions(jax.random.key(0), state_obs, 3, noise=noise)[0]
    ref_actions = model.sample_actions(jax.random.key(0), blind, 3, noise=noise)[0]
    np.testing.assert_allclose(np.asarray(actions), np.asarray(ref_actions), rtol=1e-4, atol=1e-4)
    assert fresh.img is None and count_params(fresh) < count_params(model)
    assert Observation.from_dict({"state": np.zeros((1, 32)), "tokenized_prompt": np.ones((1, 4), np.int32),
                                  "tokenized_prompt_mask": np.ones((1, 4), bool)}).images == {}
