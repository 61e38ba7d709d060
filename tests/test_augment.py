"""The paper's augmentation (section 4.1) as a specification."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from alexnet_jax import augment

# The widely used ImageNet values (pixels in 0..1); columns are eigenvectors.
EIGVAL = np.array([0.2175, 0.0188, 0.0045])
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                   [-0.5808, -0.0045, -0.8140],
                   [-0.5836, -0.6948, 0.4203]])


def coordinate_image(height=256, width=256):
  """Pixel (y, x) holds (y, x, y + x): every patch names its own position."""
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return np.stack([y, x, y + x], axis=-1).astype(np.int32)


def position(patch):
  return int(patch[0, 0, 0]), int(patch[0, 0, 1])


def test_random_crop_is_a_window_of_the_image():
  image = coordinate_image()
  for seed in range(200):
    patch = augment.random_crop(image, 227, np.random.default_rng(seed))
    top, left = position(patch)
    assert patch.shape == (227, 227, 3)
    assert 0 <= top <= 29 and 0 <= left <= 29
    np.testing.assert_array_equal(patch,
                                  image[top:top + 227, left:left + 227])
  # Height and width have their own ranges.
  tall = coordinate_image(256, 230)
  lefts = set()
  for seed in range(100):
    top, left = position(augment.random_crop(tall, 227,
                                             np.random.default_rng(seed)))
    assert 0 <= top <= 29 and 0 <= left <= 3
    lefts.add(left)
  assert lefts == {0, 1, 2, 3}


def test_random_crop_positions_are_uniform():
  # A 250 patch of 256 has 7 x 7 positions: 4,900 draws, 100 expected each.
  image = coordinate_image()
  rng = np.random.default_rng(0)
  counts = np.zeros((7, 7))
  for _ in range(4900):
    counts[position(augment.random_crop(image, 250, rng))] += 1
  chi2 = ((counts - 100) ** 2 / 100).sum()
  assert chi2 < scipy_stats.chi2.ppf(0.999, df=48), counts
  # The paper's 227 patch: all 30 x 30 offsets occur, the extremes included.
  rows, cols = set(), set()
  for _ in range(3000):
    top, left = position(augment.random_crop(image, 227, rng))
    rows.add(top)
    cols.add(left)
  assert rows == cols == set(range(30))


def test_random_crop_rejects_a_patch_larger_than_the_image():
  with pytest.raises(ValueError, match='does not fit'):
    augment.random_crop(np.zeros((200, 256, 3)), 227,
                        np.random.default_rng(0))


def test_horizontal_reflection_is_exact_with_probability_one_half():
  image = np.random.default_rng(0).normal(size=(9, 7, 3)).astype(np.float32)
  mirrored = image[:, ::-1]
  flips = 0
  for seed in range(4000):
    out = augment.horizontal_reflection(image, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == image.dtype
    if np.array_equal(out, mirrored):
      flips += 1
    else:
      np.testing.assert_array_equal(out, image)
  # Binomial(4000, 1/2): standard deviation 0.0079 of the fraction.
  assert abs(flips / 4000 - 0.5) < 0.03
  # The mirror is left-right only: the first column becomes the last.
  np.testing.assert_array_equal(augment._mirror(image)[:, 0], image[:, -1])


def test_pca_lighting_adds_one_colour_vector_from_the_eigendecomposition():
  image = np.random.default_rng(1).uniform(-128, 128, (5, 4, 3))
  out = augment.pca_lighting(image, EIGVAL, EIGVEC, np.random.default_rng(7))
  alpha = np.random.default_rng(7).normal(0, 0.1, 3)
  expected = 255 * EIGVEC @ (alpha * EIGVAL)   # statistics are of 0..1 pixels
  assert out.dtype == np.float32
  np.testing.assert_allclose(out - image, np.broadcast_to(expected, (5, 4, 3)),
                             atol=1e-4)
  same = augment.pca_lighting(image, EIGVAL, EIGVEC, np.random.default_rng(7),
                              sigma=0.0)
  np.testing.assert_allclose(same, image, atol=1e-4)


def test_pca_lighting_noise_has_the_papers_covariance():
  sigma, draws = 0.1, 20000
  rng = np.random.default_rng(3)
  zero = np.zeros((1, 1, 3), np.float32)
  noise = np.stack([augment.pca_lighting(zero, EIGVAL, EIGVEC, rng, sigma)[0, 0]
                    for _ in range(draws)]).astype(np.float64)
  expected = (255 * sigma) ** 2 * EIGVEC @ np.diag(EIGVAL ** 2) @ EIGVEC.T
  np.testing.assert_allclose(noise.mean(0), 0, atol=0.1)
  np.testing.assert_allclose(np.cov(noise.T), expected,
                             atol=0.04 * expected.max())
  # In the eigenbasis the coefficients are the a_i ~ N(0, sigma), independent:
  # this resolves the two small eigenvalues that the covariance hides.
  alphas = noise @ EIGVEC / (255 * EIGVAL)
  np.testing.assert_allclose(alphas.std(0), sigma, rtol=0.03)
  correlation = np.corrcoef(alphas.T)
  np.testing.assert_allclose(correlation, np.eye(3), atol=0.03)


def test_subtract_mean_is_per_pixel_and_float32():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
  mean_image = rng.uniform(0, 255, (6, 5, 3)).astype(np.float32)
  out = augment.subtract_mean(image, mean_image)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, image.astype(np.float32) - mean_image)
  with pytest.raises(ValueError, match='before cropping'):
    augment.subtract_mean(image, mean_image[:4])


def test_center_crop_position():
  image = coordinate_image()
  assert position(augment.center_crop(image, 227)) == (14, 14)
  assert position(augment.center_crop(image, 224)) == (16, 16)
  np.testing.assert_array_equal(augment.center_crop(image, 224),
                                image[16:240, 16:240])


def test_ten_crop_corners_centre_and_reflections():
  # Not square, so that rows and columns cannot be confused.
  image = coordinate_image(256, 250)
  patches = augment.ten_crop(image, 227)
  assert patches.shape == (10, 227, 227, 3)
  corners = [(0, 0), (0, 23), (29, 0), (29, 23), (14, 11)]
  for n, (top, left) in enumerate(corners):
    window = image[top:top + 227, left:left + 227]
    np.testing.assert_array_equal(patches[n], window)
    np.testing.assert_array_equal(patches[n + 5], window[:, ::-1])


def test_train_example_subtracts_the_mean_before_cropping():
  # The mean image varies across the image, so subtracting its central
  # patch instead of the patch at the image's position would show.
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
  mean_image = coordinate_image().astype(np.float32)
  for seed in range(5):
    out = augment.train_example(image, mean_image, 227, EIGVAL, EIGVEC,
                                np.random.default_rng(seed))
    draws = np.random.default_rng(seed)
    expected = augment.random_crop(image.astype(np.float32) - mean_image, 227,
                                   draws)
    expected = augment.horizontal_reflection(expected, draws)
    expected = augment.pca_lighting(expected, EIGVAL, EIGVEC, draws)
    assert out.shape == (227, 227, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
  again = augment.train_example(image, mean_image, 227, EIGVAL, EIGVEC,
                                np.random.default_rng(4))
  np.testing.assert_array_equal(out, again)
  other = augment.train_example(image, mean_image, 227, EIGVAL, EIGVEC,
                                np.random.default_rng(5))
  assert not np.array_equal(out, other)


def test_eval_example_is_the_centre_or_the_ten_patches_of_the_difference():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
  mean_image = rng.uniform(0, 255, (256, 256, 3)).astype(np.float32)
  difference = image.astype(np.float32) - mean_image
  np.testing.assert_array_equal(
      augment.eval_example(image, mean_image, 227),
      difference[14:241, 14:241])
  np.testing.assert_array_equal(
      augment.eval_example(image, mean_image, 227, ten=True),
      augment.ten_crop(difference, 227))


def test_imagenet_mean_std_is_torchvisions_normalisation():
  # (pixel / 255 - mean) / std per channel, as torchvision's weights expect,
  # from the 0..255 pipeline: subtract the returned image, then scale.
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
  mean_image, scale = augment.normalization(
      'imagenet_mean_std', np.zeros((16, 16, 3), np.float32))
  got = augment.eval_example(image, mean_image, 8) * scale
  centre = image[4:12, 4:12].astype(np.float64) / 255.0
  want = ((centre - np.array(augment.IMAGENET_MEAN_RGB))
          / np.array(augment.IMAGENET_STD_RGB))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mean_image_normalisation_has_no_scale():
  mean = np.full((4, 4, 3), 7.0, np.float32)
  got_mean, scale = augment.normalization('mean_image', mean)
  assert got_mean is mean and scale is None
  with pytest.raises(ValueError, match='normalization'):
    augment.normalization('per_pixel', mean)
