"""openpi's LIBERO transforms against hand-computed values; outputs invert inputs."""

import numpy as np
import pytest
from PIL import Image

from eqx_energy.data.norm_stats import NormStats
from eqx_energy.data.transforms import (
    AbsoluteActions,
    DeltaActions,
    ImagesToFloat,
    LiberoInputs,
    LiberoOutputs,
    Normalize,
    PadStatesAndActions,
    ResizeImages,
    Unnormalize,
    make_bool_mask,
    policy_transforms,
    resize_with_pad,
)

STATS = {
    "state": NormStats(mean=np.array([1.0, -2.0, 0.5]), std=np.array([2.0, 0.5, 1.0]),
                       q01=np.array([-1.0, -3.0, 0.0]), q99=np.array([3.0, -1.0, 1.0])),
    "actions": NormStats(mean=np.array([0.5, 0.0]), std=np.array([0.25, 4.0]),
                         q01=np.array([0.0, -2.0]), q99=np.array([1.0, 2.0])),
}


def libero_example(rng, size=256, horizon=5):
    return {
        "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "state": rng.normal(size=8).astype(np.float32),
        "actions": rng.normal(size=(horizon, 7)).astype(np.float32),
        "action_valid": np.array([True] * (horizon - 1) + [False]),
        "prompt": "pick up the black bowl",
        "episode_index": np.int64(3),
        "frame_index": np.int64(9),
    }


def test_libero_inputs_repack():
    rng = np.random.default_rng(0)
    example = libero_example(rng)
    out = LiberoInputs()(example)
    assert out["image"]["base_0_rgb"] is example["image"]
    assert out["image"]["left_wrist_0_rgb"] is example["wrist_image"]
    np.testing.assert_array_equal(out["image"]["right_wrist_0_rgb"], np.zeros((256, 256, 3), np.uint8))
    assert {k: bool(v) for k, v in out["image_mask"].items()} == {
        "base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False}
    for key in ("state", "actions", "action_valid", "prompt", "episode_index", "frame_index"):
        assert out[key] is example[key]
    assert "wrist_image" not in out and "image" in example  # the input dict is untouched


def test_libero_inputs_float_chw_and_missing_wrist():
    chw = np.full((3, 4, 5), 0.999, np.float32)
    out = LiberoInputs(base_key="observation/image", wrist_key=None, state_key="observation/state")(
        {"observation/image": chw, "observation/state": np.zeros(8)})
    assert out["image"]["base_0_rgb"].shape == (4, 5, 3) and out["image"]["base_0_rgb"].dtype == np.uint8
    assert (out["image"]["base_0_rgb"] == 254).all()  # (255 * 0.999).astype(uint8) truncates, as openpi
    assert not out["image_mask"]["left_wrist_0_rgb"] and not out["image"]["left_wrist_0_rgb"].any()
    with pytest.raises(ValueError, match="expected key 'image'"):
        LiberoInputs()({"state": np.zeros(8)})


def test_state_only_inputs_and_chain_carry_no_images(tmp_path):
    """base_key=None: no image / image_mask keys, no image steps in the chain; the rest is the camera chain's."""
    rng = np.random.default_rng(0)
    example = {k: v for k, v in libero_example(rng).items() if k not in ("image", "wrist_image")}
    out = LiberoInputs(base_key=None, wrist_key=None)(example)
    assert "image" not in out and "image_mask" not in out and out["state"] is not None
    with pytest.raises(ValueError, match="needs a base camera"):
        LiberoInputs(base_key=None)
    tokenizer_module = pytest.importorskip("eqx_energy.policy.tokenizer")
    model = tokenizer_module.train_sentencepiece(["pick up the black bowl"] * 20, tmp_path / "tok.model", 64)
    tokenizer = tokenizer_module.PaligemmaTokenizer(model, 16)
    stats = {"state": NormStats(mean=rng.normal(size=8), std=rng.uniform(0.5, 2, 8)),
             "actions": NormStats(mean=rng.normal(size=7), std=rng.uniform(0.5, 2, 7))}
    common = dict(norm_stats=stats, tokenizer=tokenizer, action_dim=7, delta_dims=6)
    state_only = policy_transforms(**common, keys=LiberoInputs(base_key=None, wrist_key=None))
    assert not any(isinstance(t, (ResizeImages, ImagesToFloat)) for t in state_only.inputs)
    got = example
    for transform in state_only.inputs:
        got = transform(got)
    want = libero_example(np.random.default_rng(0))
    for transform in policy_transforms(**common).inputs:
        want = transform(want)
    assert set(want) - set(got) == {"image", "image_mask"} and set(got) <= set(want)
    for key in got:
        np.testing.assert_array_equal(got[key], want[key])


def test_quantile_normalization_can_be_chosen_apart_from_the_model_format(tmp_path):
    """Pi0 normalizes with z-scores unless asked for quantiles (a discrete state in the prompt wants them)."""
    tokenizer_module = pytest.importorskip("eqx_energy.policy.tokenizer")
    model = tokenizer_module.train_sentencepiece(["open the drawer"] * 20, tmp_path / "tok.model", 64)
    tokenizer = tokenizer_module.PaligemmaTokenizer(model, 16)
    ones = NormStats(mean=np.zeros(8), std=np.ones(8), q01=-np.ones(8), q99=np.ones(8))
    stats = {"state": ones, "actions": ones}
    kinds = {}
    for use_quantiles in (None, True):
        for pi05 in (False, True):
            group = policy_transforms(norm_stats=stats, tokenizer=tokenizer, action_dim=7, pi05=pi05,
                                      use_quantiles=use_quantiles)
            kinds[use_quantiles, pi05] = [t.use_quantiles for t in (*group.inputs, *group.outputs)
                                          if isinstance(t, (Normalize, Unnormalize))]
    assert kinds == {(None, False): [False, False], (None, True): [True, True],
                     (True, False): [True, True], (True, True): [True, True]}


def test_delta_and_absolute_actions():
    state = np.arange(8, dtype=np.float32)
    actions = np.ones((2, 7), np.float32)
    mask = make_bool_mask(6, -1)
    assert mask == (True,) * 6 + (False,)
    delta = DeltaActions(mask)({"state": state, "actions": actions})
    np.testing.assert_array_equal(delta["actions"], [[1, 0, -1, -2, -3, -4, 1]] * 2)
    np.testing.assert_array_equal(actions, np.ones((2, 7)))  # not mutated
    np.testing.assert_array_equal(AbsoluteActions(mask)(delta)["actions"], actions)
    assert DeltaActions(mask)({"state": state}) == {"state": state}  # inference: no actions, no-op


def test_normalize_by_hand():
    data = {"state": np.array([3.0, -2.5, 0.5]), "actions": np.array([[1.0, -4.0]]), "prompt": "x"}
    z = Normalize(STATS)(data)
    np.testing.assert_allclose(z["state"], [2 / (2 + 1e-6), -0.5 / (0.5 + 1e-6), 0.0], rtol=1e-6)
    np.testing.assert_allclose(z["actions"], [[0.5 / (0.25 + 1e-6), -4 / (4 + 1e-6)]], rtol=1e-6)
    assert z["state"].dtype == np.float32 and z["prompt"] == "x"
    q = Normalize(STATS, use_quantiles=True)(data)
    np.testing.assert_allclose(q["state"], [4 / (4 + 1e-6) * 2 - 1, 0.5 / (2 + 1e-6) * 2 - 1, 0.5 / (1 + 1e-6) * 2 - 1],
                               rtol=1e-6)
    np.testing.assert_allclose(q["actions"], [[1 / (1 + 1e-6) * 2 - 1, -2 / (4 + 1e-6) * 2 - 1]], rtol=1e-6)
    short = Normalize(STATS)({"state": np.array([3.0, -2.5])})  # stats sliced to the data's dim
    np.testing.assert_allclose(short["state"], z["state"][:2], rtol=1e-6)


def test_unnormalize_inverts_normalize_on_padded_data():
    rng = np.random.default_rng(0)
    raw = {"state": rng.normal(size=3), "actions": rng.normal(size=(4, 2))}
    for quantiles in (False, True):
        padded = PadStatesAndActions(6)(Normalize(STATS, use_quantiles=quantiles)(raw))
        back = Unnormalize(STATS, use_quantiles=quantiles)(padded)
        np.testing.assert_allclose(back["state"][:3], raw["state"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(back["actions"][:, :2], raw["actions"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(back["actions"][:, 2:], 0.0)
    with pytest.raises(ValueError, match="needs every stats key"):
        Unnormalize(STATS)({"actions": np.zeros((4, 2))})
    with pytest.raises(ValueError, match="needs q01 and q99"):
        Normalize({"state": NormStats(mean=np.zeros(2), std=np.ones(2))}, use_quantiles=True)


def test_resize_with_pad_by_hand():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)
    out = resize_with_pad(image, 4, 4)  # ratio 2 -> 2 x 4, padded 1 row above and below
    expected = np.asarray(Image.fromarray(image).resize((4, 2), resample=Image.BILINEAR))
    np.testing.assert_array_equal(out[1:3], expected)
    np.testing.assert_array_equal(out[[0, 3]], 0)
    square = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_with_pad(square, 224, 224),
                                  np.asarray(Image.fromarray(square).resize((224, 224), resample=Image.BILINEAR)))
    assert resize_with_pad(square, 256, 256) is square
    tall = resize_with_pad(rng.integers(0, 256, (9, 3, 3), dtype=np.uint8), 4, 4)  # 4 x 1, pad left int(3/2)=1
    assert tall[:, [0, 2, 3]].max() == 0
    resized = ResizeImages(2, 2)({"image": {"base_0_rgb": image}, "state": 1})
    assert resized["image"]["base_0_rgb"].shape == (2, 2, 3) and resized["state"] == 1


def test_images_to_float_range():
    image = np.array([[[0, 255, 51]]], np.uint8)
    out = ImagesToFloat()({"image": {"base_0_rgb": image}})["image"]["base_0_rgb"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[-1.0, 1.0, 51 / 255 * 2 - 1]]], rtol=1e-6)


def test_pad_states_and_actions():
    out = PadStatesAndActions(32)({"state": np.ones(8, np.float32), "actions": np.ones((5, 7), np.float32)})
    assert out["state"].shape == (32,) and out["actions"].shape == (5, 32) and out["actions"].dtype == np.float32
    assert out["state"][8:].sum() == 0 and out["actions"][:, 7:].sum() == 0 and out["actions"][:, :7].all()
    with pytest.raises(ValueError, match="more than the model's 4"):
        PadStatesAndActions(4)({"state": np.ones(8)})


def test_pi0_libero_chain_and_inverse(tmp_path):
    tokenizer_module = pytest.importorskip("eqx_energy.policy.tokenizer")
    model = tmp_path / "tok.model"
    tokenizer_module.train_sentencepiece(["pick up the black bowl", "open the top drawer"] * 20, model, 64)
    tokenizer = tokenizer_module.PaligemmaTokenizer(model, 16)
    rng = np.random.default_rng(0)
    example = libero_example(rng)
    stats = {"state": NormStats(mean=rng.normal(size=8), std=rng.uniform(0.5, 2, 8)),
             "actions": NormStats(mean=rng.normal(size=7), std=rng.uniform(0.5, 2, 7))}
    group = policy_transforms(norm_stats=stats, tokenizer=tokenizer, action_dim=7, delta_dims=6)
    out = example
    for transform in group.inputs:
        out = transform(out)
    assert set(out) == {"image", "image_mask", "state", "actions", "action_valid", "tokenized_prompt",
                        "tokenized_prompt_mask", "episode_index", "frame_index"}
    assert out["image"]["base_0_rgb"].shape == (224, 224, 3) and out["image"]["base_0_rgb"].dtype == np.float32
    assert out["state"].shape == (32,) and out["actions"].shape == (5, 32)
    tokens, mask = tokenizer.tokenize("pick up the black bowl")
    np.testing.assert_array_equal(out["tokenized_prompt"], tokens)
    np.testing.assert_array_equal(out["tokenized_prompt_mask"], mask)
    by_hand = example["actions"].astype(np.float64).copy()
    by_hand[:, :6] -= example["state"][:6]
    by_hand = (by_hand - stats["actions"].mean) / (stats["actions"].std + 1e-6)
    np.testing.assert_allclose(out["actions"][:, :7], by_hand, rtol=1e-5, atol=1e-6)
    result = {"state": out["state"], "actions": out["actions"]}  # what the policy server hands to the outputs
    for transform in group.outputs:
        result = transform(result)
    assert set(result) == {"actions"}
    np.testing.assert_allclose(result["actions"], example["actions"], rtol=1e-5, atol=1e-5)


def test_libero_outputs_slices():
    assert LiberoOutputs(4)({"actions": np.ones((3, 32)), "state": 0})["actions"].shape == (3, 4)
