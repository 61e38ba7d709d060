"""The accelerator's augmentation equals the NumPy specification of section
4.1 (`augment.train_example`, `augment.eval_example`) for the same generator:
the patch, its reflection, the lighting, both normalisations, and the ten
test patches."""

import jax
import numpy as np
import pytest

from alexnet_jax import augment, device_augment

STORED, SIZE = 40, 31        # small stand-ins for 256 and 227
EXAMPLES = 12
EIGVAL = np.array([0.2175, 0.0188, 0.0045])
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                   [-0.5808, -0.0045, -0.8140],
                   [-0.5836, -0.6948, 0.4203]])
# On the 0..255 scale of the pixels.
TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (EXAMPLES, STORED, STORED, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def mean_image():
  # Varies across the image, so a mean patch cut at the wrong place shows.
  return np.random.default_rng(1).uniform(0, 255, (STORED, STORED, 3))


def host_train_batch(images, seed):
  """What the loader ships: the values each example's generator draws, in
  `train_example`'s order, and the uint8 patch at the drawn offset."""
  batch = {'image': [], 'offset': [], 'flip': [], 'lighting': []}
  for n, image in enumerate(images):
    top, left, flip, colour = augment.train_draws(
        image.shape[:2], SIZE, EIGVAL, EIGVEC,
        np.random.default_rng([seed, n]))
    batch['image'].append(image[top:top + SIZE, left:left + SIZE])
    batch['offset'].append((top, left))
    batch['flip'].append(flip)
    batch['lighting'].append(colour)
  return {'image': np.stack(batch['image']),
          'offset': np.asarray(batch['offset'], np.int32),
          'flip': np.asarray(batch['flip'], np.uint8),
          'lighting': np.stack(batch['lighting'])}


@pytest.mark.parametrize('normalization', augment.NORMALIZATIONS)
def test_training_patches_equal_the_numpy_specification(
    images, mean_image, normalization):
  preprocessing = augment.Preprocessing.create(normalization, mean_image,
                                               SIZE)
  mean, scale = augment.normalization(normalization,
                                      mean_image.astype(np.float32))
  flips = 0
  for seed in range(3):
    batch = host_train_batch(images, seed)
    got = device_augment.network_inputs(batch, preprocessing, train=True)
    want = np.stack([
        augment.train_example(image, mean, SIZE, EIGVAL, EIGVEC,
                              np.random.default_rng([seed, n]))
        for n, image in enumerate(images)])
    if scale is not None:
      want = want * scale
    assert got.shape == (EXAMPLES, SIZE, SIZE, 3) and got.dtype == np.float32
    # Compared on the pixels' 0..255 scale.
    np.testing.assert_allclose(got / preprocessing.scale,
                               want / preprocessing.scale, rtol=0,
                               atol=TOLERANCE)
    flips += int(batch['flip'].sum())
  # Both branches of the reflection were compared.
  assert 0 < flips < 3 * EXAMPLES


@pytest.mark.parametrize('normalization', augment.NORMALIZATIONS)
@pytest.mark.parametrize('ten', [False, True])
def test_evaluation_patches_equal_the_numpy_specification(
    images, mean_image, normalization, ten):
  preprocessing = augment.Preprocessing.create(normalization, mean_image,
                                               SIZE, ten=ten)
  mean, scale = augment.normalization(normalization,
                                      mean_image.astype(np.float32))
  got = device_augment.network_inputs({'image': images}, preprocessing,
                                      train=False)
  want = np.stack([augment.eval_example(image, mean, SIZE, ten=ten)
                   for image in images])
  if scale is not None:
    want = want * scale
  assert got.shape == want.shape == (
      (EXAMPLES, 10, SIZE, SIZE, 3) if ten else (EXAMPLES, SIZE, SIZE, 3))
  np.testing.assert_allclose(got / preprocessing.scale,
                             want / preprocessing.scale, rtol=0,
                             atol=TOLERANCE)


def test_a_batch_without_constants_is_the_network_input():
  # Digits and synthetic data: float16 images, no reflection, no lighting.
  images = np.random.default_rng(2).normal(size=(3, 5, 5, 3)).astype(
      np.float16)
  batch = {'image': images, 'offset': np.zeros((3, 2), np.int32),
           'flip': np.zeros(3, np.uint8),
           'lighting': np.zeros((3, 3), np.float32)}
  for train in (True, False):
    got = device_augment.network_inputs(batch, None, train=train)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, images.astype(np.float32))


def test_the_constants_are_replicated_and_their_sizes_static(mean_image):
  preprocessing = augment.Preprocessing.create('mean_image', mean_image,
                                               SIZE, ten=True)
  mesh = jax.make_mesh((2,), ('x',), devices=jax.devices()[:2])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  constants = device_augment.put(preprocessing, sharding)
  assert constants.mean_image.sharding.is_fully_replicated
  np.testing.assert_array_equal(constants.mean_image,
                                mean_image.astype(np.float32))
  np.testing.assert_array_equal(constants.scale, np.ones(3))
  # Only the arrays are leaves: the patch positions shape the program.
  assert len(jax.tree.leaves(constants)) == 2
  assert constants.patches == augment.ten_crop_positions(STORED, STORED, SIZE)
  assert device_augment.put(None, sharding) is None
