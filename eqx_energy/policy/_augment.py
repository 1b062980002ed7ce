"""Training-time image augmentation in the style of openpi's `preprocess_observation(train=True)`.

Per example and camera, on images mapped from [-1, 1] to [0, 1]: cameras without "wrist" in their
name get a random 95% crop resized back and a rotation in [-5, 5] degrees; every camera gets a colour
jitter (brightness 0.3, contrast 0.4, saturation 0.5). The same distributions as openpi's augmax
chain, not its exact random stream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def _crop_resize(key: PRNGKeyArray, img: Float[Array, "H W 3"]) -> Float[Array, "H W 3"]:
    h, w = img.shape[:2]
    ch, cw = int(h * 0.95), int(w * 0.95)
    ykey, xkey = jax.random.split(key)
    y0 = jax.random.randint(ykey, (), 0, h - ch + 1)
    x0 = jax.random.randint(xkey, (), 0, w - cw + 1)
    crop = jax.lax.dynamic_slice(img, (y0, x0, 0), (ch, cw, 3))
    return jax.image.resize(crop, img.shape, "linear")


def _rotate(key: PRNGKeyArray, img: Float[Array, "H W 3"]) -> Float[Array, "H W 3"]:
    h, w = img.shape[:2]
    angle = jnp.deg2rad(jax.random.uniform(key, (), minval=-5.0, maxval=5.0))
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src_y = cos * (yy - cy) - sin * (xx - cx) + cy
    src_x = sin * (yy - cy) + cos * (xx - cx) + cx
    rot = [jax.scipy.ndimage.map_coordinates(img[..., c], [src_y, src_x], order=1, mode="constant") for c in range(3)]
    return jnp.stack(rot, axis=-1)


def _color_jitter(key: PRNGKeyArray, img: Float[Array, "H W 3"]) -> Float[Array, "H W 3"]:
    bkey, ckey, skey = jax.random.split(key, 3)
    img = img * jax.random.uniform(bkey, (), minval=0.7, maxval=1.3)
    mean = jnp.mean(img)
    img = (img - mean) * jax.random.uniform(ckey, (), minval=0.6, maxval=1.4) + mean
    gray = jnp.dot(img, jnp.array([0.299, 0.587, 0.114], img.dtype))[..., None]
    img = gray + (img - gray) * jax.random.uniform(skey, (), minval=0.5, maxval=1.5)
    return jnp.clip(img, 0.0, 1.0)


def _augment_one(key: PRNGKeyArray, img: Float[Array, "H W 3"], geometric: bool) -> Float[Array, "H W 3"]:
    ckey, rkey, jkey = jax.random.split(key, 3)
    x = (img.astype(jnp.float32) + 1.0) / 2.0
    if geometric:
        x = _rotate(rkey, _crop_resize(ckey, x))
    return (_color_jitter(jkey, x) * 2.0 - 1.0).astype(img.dtype)


def augment_images(key: PRNGKeyArray, obs):
    """Return `obs` with every camera's images augmented (batched; one key per example and camera)."""
    images = {}
    for i, (cam, batch) in enumerate(sorted(obs.images.items())):
        keys = jax.random.split(jax.random.fold_in(key, i), batch.shape[0])
        images[cam] = jax.vmap(lambda k, x, g="wrist" not in cam: _augment_one(k, x, g))(keys, batch)
    return type(obs)(images, obs.image_masks, obs.state, obs.tokenized_prompt, obs.tokenized_prompt_mask)
