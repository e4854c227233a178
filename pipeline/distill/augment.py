"""Data augmentation inside a KIP step: random translations (pad, then crop back) and flips.

The KIP-ConvNet paper uses augmentation in every KIP setting of its Table 1 (../shared/ANCHORS.md);
it keeps a support from fitting the exact pixel positions of one target batch. A translation is a
crop of the zero-padded image, so it is linear in the pixels and gradients flow through it into the
support. Every draw is a function of (seed, step) alone, made on the host and passed into the
jitted step, so a resumed run sees exactly the augmentations of the uninterrupted one.

Flips are for data whose labels survive a mirror image (clothes, CIFAR-10's objects), never digits:
a mirrored 2 is no 2, so the pipeline refuses `distill.augment=crop_flip` for them
(`workflow.NOT_MIRRORABLE`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_STREAM = 7  # the augmentation's own random stream: no other draw of a run uses it


def step_key(seed: int, step: int) -> np.ndarray:
    """The key of one step's augmentations, as raw uint32 data (a host array the step takes)."""
    return np.asarray(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _STREAM), step))


def apply(key: jax.Array, images: jax.Array, method: str, pad: int) -> jax.Array:
    """Each image shifted by a uniform random offset in [-pad, pad] along both axes (zeros fill in),
    and, for crop_flip, mirrored left-right with probability 1/2. Identity for method=none."""
    if method == "none" or (pad == 0 and method == "crop"):
        return images
    n, height, width = images.shape[:3]
    shift_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(shift_key, (n, 2), 0, 2 * pad + 1)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, images.shape[3]))

    out = jax.vmap(crop)(padded, offsets)
    if method == "crop_flip":
        flips = jax.random.bernoulli(flip_key, 0.5, (n,))
        out = jnp.where(flips[:, None, None, None], out[:, :, ::-1, :], out)
    return out
