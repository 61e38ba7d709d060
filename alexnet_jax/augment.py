"""The paper's preprocessing and data augmentation, as small NumPy functions.

Krizhevsky et al. 2012, section 2: images are 256x256 (shorter side resized,
central crop; the prepared store holds them so) and the per-pixel mean image
of the training set is subtracted. Section 4.1 adds two label-preserving
transformations: random 224x224 patches (227x227 for the 2012 network's
arithmetic) with their horizontal reflections, and PCA lighting noise. At test
time the network sees ten patches: the four corners and the centre, and their
reflections, and the softmax outputs are averaged.

Every random function takes a `numpy.random.Generator` and draws from it in a
fixed order, so an example's augmentation is a function of its generator only.
Images are HWC arrays, pixels on the 0..255 scale.

These functions are the specification. Training and evaluation run them
elsewhere: the host draws an example's values (`train_draws`: the patch's
position, the reflection, the lighting colour) and cuts the uint8 patch, and
the accelerator does the arithmetic (`alexnet_jax.device_augment`) with the
constants that `Preprocessing` describes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# torchvision's ImageNet normalisation, on the 0..1 scale: its published
# weights expect (pixel / 255 - mean) / std per channel.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
NORMALIZATIONS = ('mean_image', 'imagenet_mean_std')


def normalization(name: str, mean_image: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray | None]:
  """(image to subtract, per-channel factor applied afterwards or None).

  'mean_image': the training set's per-pixel mean (section 2), no factor.
  'imagenet_mean_std': torchvision's per-channel mean as an image of the same
  shape, then 1/std; on the 0..255 scale, the same as torchvision's
  normalisation of 0..1 pixels.
  """
  if name == 'mean_image':
    return mean_image, None
  if name == 'imagenet_mean_std':
    mean = np.broadcast_to(255.0 * np.asarray(IMAGENET_MEAN_RGB, np.float32),
                           mean_image.shape)
    return np.ascontiguousarray(mean), (
        1.0 / (255.0 * np.asarray(IMAGENET_STD_RGB, np.float32)))
  raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got '
                   f'{name!r}')


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """What the accelerator needs, besides each example's values, to turn a
  dataset's uint8 images into network inputs.

  mean_image: [H, W, 3] float32, subtracted from the stored H x W images
    (the training set's per-pixel mean, or torchvision's per-channel mean
    repeated; see `normalization`).
  scale: [3] float32, the per-channel factor applied last (ones for the
    paper's normalisation).
  size: the network input; training patches are cut on the host at the
    offsets they ship, evaluation patches on the accelerator.
  patches: the evaluation patches as (top, left, reflected): the centre, or
    the ten of `ten_crop`.
  """

  mean_image: np.ndarray
  scale: np.ndarray
  size: int
  patches: tuple[tuple[int, int, bool], ...]

  @classmethod
  def create(cls, name: str, mean_image: np.ndarray, size: int, *,
             ten: bool = False) -> 'Preprocessing':
    """The `name` normalisation (see `normalization`) of images shaped like
    `mean_image`, with size x size patches."""
    mean, scale = normalization(name, np.asarray(mean_image, np.float32))
    height, width = mean.shape[:2]
    patches = (ten_crop_positions(height, width, size) if ten
               else (center_position(height, width, size) + (False,),))
    return cls(np.ascontiguousarray(mean, np.float32),
               np.ones(3, np.float32) if scale is None
               else np.asarray(scale, np.float32), size, patches)


def subtract_mean(image: np.ndarray, mean_image: np.ndarray) -> np.ndarray:
  """The image minus the training set's per-pixel mean image (section 2),
  as float32. Both are the full 256x256, before any patch is taken."""
  if image.shape != mean_image.shape:
    raise ValueError(f'image {image.shape} and mean image {mean_image.shape} '
                     'differ in shape; the mean is subtracted before cropping')
  return np.subtract(image, mean_image, dtype=np.float32)


def random_crop(image: np.ndarray, size: int,
                rng: np.random.Generator) -> np.ndarray:
  """A size x size patch at a position drawn uniformly from all of them
  (section 4.1: (256 - 224)^2 translations; 30 x 30 for 227). Draws the row
  offset, then the column offset."""
  top, left = crop_position(image.shape[:2], size, rng)
  return image[top:top + size, left:left + size]


def crop_position(shape: tuple[int, int], size: int,
                  rng: np.random.Generator) -> tuple[int, int]:
  """(top, left) of `random_crop`'s patch in an image of `shape`."""
  height, width = shape
  if size > height or size > width:
    raise ValueError(f'a {size}x{size} patch does not fit in a '
                     f'{height}x{width} image')
  top = int(rng.integers(0, height - size + 1))
  left = int(rng.integers(0, width - size + 1))
  return top, left


def horizontal_reflection(image: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
  """The image mirrored left-right with probability 1/2 (section 4.1); one
  uniform draw."""
  if reflection(rng):
    return _mirror(image)
  return image


def reflection(rng: np.random.Generator) -> bool:
  """Whether `horizontal_reflection` mirrors the image."""
  return bool(rng.random() < 0.5)


def _mirror(image: np.ndarray) -> np.ndarray:
  # Reversing the width axis directly makes NumPy copy 3-value pixels one
  # value at a time; as one opaque item per pixel it is about 3x faster.
  image = np.ascontiguousarray(image)
  pixel = np.dtype((np.void, image.shape[-1] * image.itemsize))
  pixels = image.view(pixel).reshape(image.shape[:-1])
  return np.ascontiguousarray(pixels[:, ::-1]).view(image.dtype).reshape(
      image.shape)


def pca_lighting(image: np.ndarray, eigval: np.ndarray, eigvec: np.ndarray,
                 rng: np.random.Generator, sigma: float = 0.1) -> np.ndarray:
  """Adds [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T to every pixel (section 4.1).

  p_i (the columns of `eigvec`) and l_i (`eigval`) are the eigenvectors and
  eigenvalues of the 3x3 covariance of the training set's RGB values, and
  a_i ~ N(0, sigma) is drawn once per image (three normal draws). The
  statistics are of pixels scaled to 0..1, as the widely used ImageNet values
  are, while the images here are on the 0..255 scale: the added vector is
  therefore multiplied by 255. Returns float32.
  """
  rgb = lighting_colour(eigval, eigvec, rng, sigma)
  height, width, channels = image.shape
  # The colour repeated along a whole row: broadcasting a 3-vector over the
  # last axis runs NumPy's inner loop 3 values at a time, about 10x slower.
  row = np.tile(rgb, width)
  return np.add(image.reshape(height, width * channels), row,
                dtype=np.float32).reshape(height, width, channels)


def lighting_colour(eigval: np.ndarray, eigvec: np.ndarray,
                    rng: np.random.Generator, sigma: float = 0.1
                    ) -> np.ndarray:
  """The colour `pca_lighting` adds, float32 [3] on the 0..255 scale."""
  return lighting_colours(lighting_coefficients(rng, sigma)[None], eigval,
                          eigvec)[0]


def lighting_coefficients(rng: np.random.Generator, sigma: float = 0.1
                          ) -> np.ndarray:
  """The a_i of `pca_lighting`: three normal draws, float64 [3]."""
  return rng.normal(0.0, sigma, size=3)


def lighting_colours(alphas: np.ndarray, eigval: np.ndarray,
                     eigvec: np.ndarray) -> np.ndarray:
  """255 [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T for each row of `alphas`
  ([N, 3] coefficients), float32 [N, 3].

  Written as products and sums in a fixed order, in float64, rather than a
  matrix product, whose rounding may depend on how many rows it is given:
  one example and a whole batch of them get the same colours.
  """
  weights = np.asarray(alphas, np.float64) * np.asarray(eigval, np.float64)
  eigvec = np.asarray(eigvec, np.float64)
  rgb = (weights[:, 0:1] * eigvec[:, 0] + weights[:, 1:2] * eigvec[:, 1]
         + weights[:, 2:3] * eigvec[:, 2])
  return (255.0 * rgb).astype(np.float32)


def draw_train(shape: tuple[int, int], size: int, rng: np.random.Generator,
               lighting_sigma: float = 0.1
               ) -> tuple[int, int, bool, np.ndarray]:
  """(top, left, reflected, lighting coefficients): what `train_example`
  draws from `rng`, in its order, for an image of `shape`."""
  top, left = crop_position(shape, size, rng)
  reflected = reflection(rng)
  return top, left, reflected, lighting_coefficients(rng, lighting_sigma)


def draw_train_batch(shape: tuple[int, int], size: int, streams,
                     lighting_sigma: float = 0.1
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """`draw_train` for every example of a batch, from its own stream in
  `streams` (an `alexnet_jax.streams.Batch`), drawn for all at once:
  (top, left, reflected, lighting coefficients), int64 [N] twice, bool [N]
  and float64 [N, 3]. The same draws in the same order; an example whose
  draws the batch could not finish takes `draw_train` itself."""
  height, width = shape
  if size > height or size > width:
    raise ValueError(f'a {size}x{size} patch does not fit in a '
                     f'{height}x{width} image')
  count = len(streams)
  top, left = np.zeros(count, np.int64), np.zeros(count, np.int64)
  reflected, alphas = np.zeros(count, bool), np.zeros((count, 3))
  if streams.batched:
    top = streams.integers(0, height - size + 1)
    left = streams.integers(0, width - size + 1)
    reflected = streams.random() < 0.5
    alphas = streams.normal(0.0, lighting_sigma, 3)
    redrawn = np.flatnonzero(streams.unfinished)
  else:
    redrawn = range(count)
  for n in redrawn:
    top[n], left[n], reflected[n], alphas[n] = draw_train(
        shape, size, streams.generator(n), lighting_sigma)
  return top, left, reflected, alphas


def train_draws(shape: tuple[int, int], size: int, eigval: np.ndarray,
                eigvec: np.ndarray, rng: np.random.Generator,
                lighting_sigma: float = 0.1
                ) -> tuple[int, int, bool, np.ndarray]:
  """(top, left, reflected, lighting colour): the values `train_example`
  draws from `rng`, with the colour it adds (`lighting_colour`)."""
  top, left, reflected, alpha = draw_train(shape, size, rng, lighting_sigma)
  return top, left, reflected, lighting_colours(alpha[None], eigval,
                                                eigvec)[0]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central size x size patch; an odd margin leaves the extra row and
  column at the bottom and right."""
  top, left = center_position(*image.shape[:2], size)
  return image[top:top + size, left:left + size]


def center_position(height: int, width: int, size: int) -> tuple[int, int]:
  return (height - size) // 2, (width - size) // 2


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The ten test patches of section 4.1, as [10, size, size, C], in the
  order of `ten_crop_positions`."""
  patches = []
  for top, left, reflected in ten_crop_positions(*image.shape[:2], size):
    patch = image[top:top + size, left:left + size]
    patches.append(patch[:, ::-1] if reflected else patch)
  return np.stack(patches)


def ten_crop_positions(height: int, width: int, size: int
                       ) -> tuple[tuple[int, int, bool], ...]:
  """(top, left, reflected) of the ten test patches: top-left, top-right,
  bottom-left, bottom-right, centre, then the same five reflected
  horizontally."""
  bottom, right = height - size, width - size
  five = ((0, 0), (0, right), (bottom, 0), (bottom, right),
          center_position(height, width, size))
  return tuple((top, left, reflected) for reflected in (False, True)
               for top, left in five)


def train_example(image: np.ndarray, mean_image: np.ndarray, size: int,
                  eigval: np.ndarray, eigvec: np.ndarray,
                  rng: np.random.Generator,
                  lighting_sigma: float = 0.1) -> np.ndarray:
  """A training input from a decoded 256x256 image: mean subtraction, a
  random patch, a random reflection and lighting noise, in the paper's order
  and drawing from `rng` in that order. float32 [size, size, 3]."""
  image = subtract_mean(image, mean_image)
  image = random_crop(image, size, rng)
  image = horizontal_reflection(image, rng)
  return pca_lighting(image, eigval, eigvec, rng, sigma=lighting_sigma)


def eval_example(image: np.ndarray, mean_image: np.ndarray, size: int, *,
                 ten: bool = False) -> np.ndarray:
  """A test input: the centre patch [size, size, 3] or the ten patches
  [10, size, size, 3] of the mean-subtracted image, float32."""
  image = subtract_mean(image, mean_image)
  if ten:
    return ten_crop(image, size)
  return np.ascontiguousarray(center_crop(image, size))
