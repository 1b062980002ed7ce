"""openpi's LIBERO input/output transforms on single numpy examples, as small frozen dataclasses.

Every transform maps a dict to a new dict and never mutates its input. Training applies
`policy_transforms(...).inputs` in order (openpi's chain for pi0_libero / pi05_libero):

  LiberoInputs     dataset keys -> image {base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb} uint8 HWC,
                   image_mask (True = real camera; zeros + False where absent), state, actions, prompt
                   (state-only, base_key=None: no image / image_mask, and no image steps below)
  DeltaActions     actions[..., :d] -= state[:d] on the masked dims (pi0_libero: the first 6)
  Normalize        z-score (x - mean) / (std + 1e-6) (Pi0), or quantile (x - q01) / (q99 - q01 + 1e-6) * 2 - 1
                   (Pi0.5), with the stats sliced to the data's dim
  ResizeImages     PIL bilinear resize-with-pad on uint8 (ratio = max(w/W, h/H), zero pad, offset int(pad/2))
  ImagesToFloat    uint8 -> float32 x / 255 * 2 - 1, in [-1, 1] (openpi does this on device)
  TokenizePrompt   prompt -> tokenized_prompt int32 (L,), tokenized_prompt_mask bool (L,)
  PadStatesAndActions  zero-pad state and actions to the model's 32 dims

and the server applies `.outputs` to the model's (normalized, padded) output: Unnormalize (z: mean
padded with 0, std with 1; quantile: only the stats' dims), AbsoluteActions, LiberoOutputs (slice).
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from eqx_energy.data.norm_stats import NormStats

Example = dict[str, Any]
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
_PASSTHROUGH = ("actions", "action_valid", "prompt", "episode_index", "frame_index")


@runtime_checkable
class DataTransformFn(Protocol):
    def __call__(self, data: Example) -> Example: ...


@runtime_checkable
class Tokenizer(Protocol):
    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]: ...


def make_bool_mask(*dims: int) -> tuple[bool, ...]:
    """make_bool_mask(6, -1) == 6 x True + 1 x False (openpi's helper)."""
    return tuple(flag for d in dims for flag in [d > 0] * abs(d))


@dataclasses.dataclass(frozen=True)
class Compose:
    """Apply the transforms in order."""

    transforms: tuple[DataTransformFn, ...]

    def __call__(self, data: Example) -> Example:
        for transform in self.transforms:
            data = transform(data)
        return data


@dataclasses.dataclass(frozen=True)
class Group:
    """Input transforms and the output transforms that undo them (outputs run in the listed order)."""

    inputs: tuple[DataTransformFn, ...] = ()
    outputs: tuple[DataTransformFn, ...] = ()

    def push(self, *, inputs: Sequence[DataTransformFn] = (), outputs: Sequence[DataTransformFn] = ()) -> "Group":
        """Append `inputs` after ours and prepend `outputs` before ours, so the outputs undo in reverse order."""
        return Group(inputs=(*self.inputs, *inputs), outputs=(*outputs, *self.outputs))


def _parse_image(image: Any) -> np.ndarray:
    """uint8 HWC from uint8/float [0, 1] HWC or CHW (floats truncate as openpi's (255 * x).astype(uint8))."""
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.floating):
        image = (255 * image).astype(np.uint8)
    if image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.transpose(image, (1, 2, 0))
    return image


@dataclasses.dataclass(frozen=True)
class LiberoInputs:
    """Repack to the policy's observation layout; keys are the dataset's (or the client's) names.

    base_key=None is a state-only policy: the output has no `image` / `image_mask` at all."""

    base_key: str | None = "image"
    wrist_key: str | None = "wrist_image"
    state_key: str = "state"

    def __post_init__(self):
        if self.base_key is None and self.wrist_key is not None:
            raise ValueError(f"a wrist camera ({self.wrist_key!r}) needs a base camera; base_key is None (state-only): "
                             "set wrist_key=None too")

    @property
    def state_only(self) -> bool:
        return self.base_key is None

    def __call__(self, data: Example) -> Example:
        cameras = tuple(k for k in (self.base_key, self.wrist_key) if k)
        for key in (self.state_key, *cameras):
            if key not in data:
                raise ValueError(f"LiberoInputs expected key {key!r}; the example has {sorted(data)}. Set "
                                 "base_key / wrist_key / state_key to the dataset's or client's names")
        if self.state_only:
            out = {"state": np.asarray(data[self.state_key])}
            out.update({k: data[k] for k in _PASSTHROUGH if k in data})
            return out
        base = _parse_image(data[self.base_key])
        wrist = _parse_image(data[self.wrist_key]) if self.wrist_key else np.zeros_like(base)
        out = {"state": np.asarray(data[self.state_key]),
               "image": dict(zip(CAMERAS, (base, wrist, np.zeros_like(base)))),
               "image_mask": dict(zip(CAMERAS, (np.True_, np.bool_(self.wrist_key is not None), np.False_)))}
        out.update({k: data[k] for k in _PASSTHROUGH if k in data})
        return out


def _delta(data: Example, mask: Sequence[bool], sign: float) -> Example:
    if "actions" not in data:
        return data
    mask = np.asarray(mask, bool)
    dims = len(mask)
    state, actions = np.asarray(data["state"]), np.asarray(data["actions"])
    if state.shape[-1] < dims or actions.shape[-1] < dims:
        raise ValueError(f"delta mask covers {dims} dims but state has {state.shape[-1]} and actions "
                         f"{actions.shape[-1]}; shorten the mask")
    shift = np.zeros(actions.shape[-1], actions.dtype)
    shift[:dims] = np.where(mask, state[..., :dims], 0)
    return {**data, "actions": actions + sign * shift}


@dataclasses.dataclass(frozen=True)
class DeltaActions:
    """actions[..., i] -= state[i] where mask[i] (absolute -> delta)."""

    mask: tuple[bool, ...]

    def __call__(self, data: Example) -> Example:
        return _delta(data, self.mask, -1.0)


@dataclasses.dataclass(frozen=True)
class AbsoluteActions:
    """actions[..., i] += state[i] where mask[i] (delta -> absolute; inverse of DeltaActions)."""

    mask: tuple[bool, ...]

    def __call__(self, data: Example) -> Example:
        return _delta(data, self.mask, 1.0)


def _check_quantiles(stats: Mapping[str, NormStats]) -> None:
    for key, s in stats.items():
        if s.q01 is None or s.q99 is None:
            raise ValueError(f"quantile normalization needs q01 and q99, but the stats for {key!r} have none; "
                             "recompute the norm stats or use z-score normalization (use_quantiles=False)")


@dataclasses.dataclass(frozen=True)
class Normalize:
    """z-score or quantile normalization of the keys present in both the data and the stats; float32 out."""

    stats: Mapping[str, NormStats]
    use_quantiles: bool = False

    def __post_init__(self):
        if self.use_quantiles:
            _check_quantiles(self.stats)

    def __call__(self, data: Example) -> Example:
        out = dict(data)
        for key, s in self.stats.items():
            if key not in data:
                continue
            x = np.asarray(data[key], np.float64)
            d = x.shape[-1]
            if self.use_quantiles:
                y = (x - s.q01[:d]) / (s.q99[:d] - s.q01[:d] + 1e-6) * 2.0 - 1.0
            else:
                y = (x - s.mean[:d]) / (s.std[:d] + 1e-6)
            out[key] = y.astype(np.float32)
        return out


@dataclasses.dataclass(frozen=True)
class Unnormalize:
    """Inverse of Normalize for every key of the stats (all must be present); extra padded dims pass through."""

    stats: Mapping[str, NormStats]
    use_quantiles: bool = False

    def __post_init__(self):
        if self.use_quantiles:
            _check_quantiles(self.stats)

    def __call__(self, data: Example) -> Example:
        missing = [k for k in self.stats if k not in data]
        if missing:
            raise ValueError(f"Unnormalize needs every stats key; {missing} are not in the data {sorted(data)}")
        out = dict(data)
        for key, s in self.stats.items():
            x = np.asarray(data[key], np.float64)
            d = min(len(s.mean), x.shape[-1])
            if self.use_quantiles:
                head = (x[..., :d] + 1.0) / 2.0 * (s.q99[:d] - s.q01[:d] + 1e-6) + s.q01[:d]
            else:
                head = x[..., :d] * (s.std[:d] + 1e-6) + s.mean[:d]
            out[key] = np.concatenate([head, x[..., d:]], axis=-1).astype(np.float32)
        return out


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bilinear resize of a uint8 HWC image keeping its aspect ratio, zero-padded to (height, width)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    ratio = max(w / width, h / height)
    new_h, new_w = int(h / ratio), int(w / ratio)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR))
    out = np.zeros((height, width, image.shape[2]), image.dtype)
    top, left = max(0, int((height - new_h) / 2)), max(0, int((width - new_w) / 2))
    out[top:top + new_h, left:left + new_w] = resized
    return out


@dataclasses.dataclass(frozen=True)
class ResizeImages:
    """Resize-with-pad every camera to (height, width) (openpi: 224 x 224)."""

    height: int
    width: int

    def __call__(self, data: Example) -> Example:
        return {**data, "image": {k: resize_with_pad(v, self.height, self.width) for k, v in data["image"].items()}}


@dataclasses.dataclass(frozen=True)
class ImagesToFloat:
    """uint8 [0, 255] -> float32 x / 255 * 2 - 1 in [-1, 1]."""

    def __call__(self, data: Example) -> Example:
        images = {}
        for key, image in data["image"].items():
            if image.dtype != np.uint8:
                raise ValueError(f"ImagesToFloat expects uint8 images; {key!r} is {image.dtype}")
            images[key] = image.astype(np.float32) * np.float32(2 / 255) - np.float32(1.0)
        return {**data, "image": images}


@dataclasses.dataclass(frozen=True)
class TokenizePrompt:
    """prompt -> tokenized_prompt (int32) + tokenized_prompt_mask (bool, True = real token); drops `prompt`.

    With discrete_state (Pi0.5 format) the normalized, unpadded state goes into the text.
    """

    tokenizer: Tokenizer
    discrete_state: bool = False

    def __call__(self, data: Example) -> Example:
        if "prompt" not in data:
            raise ValueError(f"TokenizePrompt needs a 'prompt'; the example has {sorted(data)}")
        out = {k: v for k, v in data.items() if k != "prompt"}
        state = np.asarray(data["state"]) if self.discrete_state else None
        tokens, mask = self.tokenizer.tokenize(str(data["prompt"]), state)
        out["tokenized_prompt"] = np.asarray(tokens, np.int32)
        out["tokenized_prompt_mask"] = np.asarray(mask, bool)
        return out


def _pad(x: np.ndarray, dim: int, key: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape[-1] > dim:
        raise ValueError(f"{key} has {x.shape[-1]} dims, more than the model's {dim}; raise model_action_dim")
    return np.concatenate([x, np.zeros((*x.shape[:-1], dim - x.shape[-1]), x.dtype)], axis=-1)


@dataclasses.dataclass(frozen=True)
class PadStatesAndActions:
    """Zero-pad state (and actions, when present) to model_action_dim (32)."""

    model_action_dim: int = 32

    def __call__(self, data: Example) -> Example:
        out = {**data, "state": _pad(data["state"], self.model_action_dim, "state")}
        if "actions" in data:
            out["actions"] = _pad(data["actions"], self.model_action_dim, "actions")
        return out


@dataclasses.dataclass(frozen=True)
class LiberoOutputs:
    """Keep the robot's first action_dim dims of the actions (7 for LIBERO, 4 for Meta-World)."""

    action_dim: int = 7

    def __call__(self, data: Example) -> Example:
        return {"actions": np.asarray(data["actions"])[..., : self.action_dim]}


def policy_transforms(
    *,
    norm_stats: Mapping[str, NormStats],
    tokenizer: Tokenizer,
    action_dim: int,
    pi05: bool = False,
    delta_dims: int | None = None,
    image_size: int = 224,
    model_action_dim: int = 32,
    discrete_state: bool = False,
    use_quantiles: bool | None = None,
    keys: LiberoInputs = LiberoInputs(),
) -> Group:
    """openpi's chain: pi0_libero = (pi05=False, delta_dims=6, action_dim=7); pi05_libero = (pi05=True).

    `use_quantiles=None` normalizes as openpi does (quantiles for Pi0.5, z-score for Pi0); a discrete state
    wants quantiles (its bins cover [-1, 1]). `keys.base_key=None` (state-only) drops the image steps."""
    quantiles = pi05 if use_quantiles is None else use_quantiles
    group = Group(inputs=(keys,), outputs=(LiberoOutputs(action_dim),))
    if delta_dims:
        mask = make_bool_mask(delta_dims, -(action_dim - delta_dims))
        group = group.push(inputs=(DeltaActions(mask),), outputs=(AbsoluteActions(mask),))
    images = () if keys.state_only else (ResizeImages(image_size, image_size), ImagesToFloat())
    return group.push(
        inputs=(Normalize(norm_stats, use_quantiles=quantiles), *images,
                TokenizePrompt(tokenizer, discrete_state=discrete_state), PadStatesAndActions(model_action_dim)),
        outputs=(Unnormalize(norm_stats, use_quantiles=quantiles),),
    )
