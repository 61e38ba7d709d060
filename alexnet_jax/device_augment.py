"""Section 4.1's augmentation on the accelerator, from uint8 images.

The host decodes and cuts; it ships one byte per input value and a few per
example. Everything else happens here, inside the jitted step, per device:

  training    image     uint8 [B, S, S, 3], the patch at `offset` of the
                        stored image, cut on the host
              offset    int32 [B, 2], (top, left) of that patch
              flip      uint8 [B], 1: reflected horizontally
              lighting  float32 [B, 3], the PCA colour, 0..255 scale
  evaluation  image     uint8 [B, H, W, 3], the stored image, shipped once;
                        the centre patch or the ten patches are cut here

with a dataset's `Constants` (the mean image, the per-channel scale, the
evaluation patches), put on every device once. The values are the ones
`augment.train_example` and `augment.eval_example` compute on the host from
the same generators, in the same float32 operations and order: a patch is
(pixel - mean) at the same position, reflected, plus the colour, times the
scale.

A batch without constants (`constants=None`) is a network input already
(float16 or float32 images, as digits and synthetic data keep them, and as a
batch made by hand is): it is only cast to float32, and reflected and lit
where the batch says so.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import augment


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Constants:
  """`augment.Preprocessing` on the devices: arrays replicated over the
  mesh, the sizes static (they decide shapes)."""

  mean_image: jax.Array
  scale: jax.Array
  size: int = dataclasses.field(metadata={'static': True})
  patches: tuple[tuple[int, int, bool], ...] = dataclasses.field(
      metadata={'static': True})


def put(preprocessing: augment.Preprocessing | None,
        sharding: jax.sharding.Sharding) -> Constants | None:
  """The constants on every device of `sharding` (a replicated one), from
  each process's identical copy; None stays None."""
  if preprocessing is None:
    return None
  place = lambda x: jax.make_array_from_process_local_data(sharding, x)
  return Constants(place(preprocessing.mean_image),
                   place(preprocessing.scale), preprocessing.size,
                   preprocessing.patches)


def _mean_patches(mean_image: jax.Array, offsets: jax.Array,
                  size: int) -> jax.Array:
  """The mean image's patch at each example's (top, left)."""
  channels = mean_image.shape[-1]
  cut = lambda offset: jax.lax.dynamic_slice(
      mean_image, (offset[0], offset[1], 0), (size, size, channels))
  return jax.vmap(cut)(offsets)


def train_inputs(batch: dict, constants: Constants | None) -> jax.Array:
  """Network inputs, float32 [B, S, S, 3], of a training batch."""
  # Named, so that a profile of the step can tell its operations apart.
  with jax.named_scope('device_augment'):
    return _train_inputs(batch, constants)


def _train_inputs(batch, constants):
  images = batch['image'].astype(jnp.float32)
  if constants is not None:
    images = images - _mean_patches(constants.mean_image, batch['offset'],
                                    images.shape[1])
  if 'flip' in batch:
    flip = batch['flip'].astype(bool)[:, None, None, None]
    images = jnp.where(flip, images[:, :, ::-1], images)
  if 'lighting' in batch:
    images = images + batch['lighting'].astype(jnp.float32)[:, None, None, :]
  if constants is not None:
    images = images * constants.scale
  return images


def eval_inputs(batch: dict, constants: Constants | None) -> jax.Array:
  """Network inputs of an evaluation batch: [B, S, S, 3] for the centre
  patch, [B, P, S, S, 3] for several (the ten of section 4.1)."""
  images = batch['image'].astype(jnp.float32)
  if constants is None:
    return images
  images = images - constants.mean_image
  size = constants.size
  patches = []
  for top, left, reflected in constants.patches:
    patch = images[:, top:top + size, left:left + size]
    patches.append(patch[:, :, ::-1] if reflected else patch)
  if len(patches) == 1:
    return patches[0] * constants.scale
  return jnp.stack(patches, axis=1) * constants.scale


@jax.jit
def _train_on_one_device(batch, constants):
  return train_inputs(batch, constants)


@jax.jit
def _eval_on_one_device(batch, constants):
  return eval_inputs(batch, constants)


def network_inputs(batch: dict, preprocessing: augment.Preprocessing | None,
                   *, train: bool) -> np.ndarray:
  """What the step computes from a host batch, on this process's first
  device, as NumPy: for prediction and for checking a batch by eye."""
  device = jax.local_devices()[0]
  constants = put(preprocessing, jax.sharding.SingleDeviceSharding(device))
  keys = ('image', 'offset', 'flip', 'lighting')
  batch = {k: jax.device_put(v, device) for k, v in batch.items()
           if k in keys}
  compute = _train_on_one_device if train else _eval_on_one_device
  return np.asarray(compute(batch, constants))
