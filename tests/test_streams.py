"""The batch-made example streams are `default_rng([seed, epoch, index])`
itself: the same seeding words, the same PCG64 state, the same draws."""

import numpy as np
import pytest

from alexnet_jax import augment, streams

# Small values, zeros (SeedSequence reads 0 as one word, like any value
# below 2**32), the largest one-word values, and random ones.
EDGES = [[0, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [2 ** 32 - 1] * 3,
         [2 ** 31, 7, 2 ** 32 - 1]]


def test_seed_states_are_seed_sequences_words():
  rows = np.concatenate([EDGES, np.random.default_rng(0).integers(
      0, 2 ** 32, (200, 3))]).astype(np.uint32)
  got = streams.seed_states(rows)
  assert got.dtype == np.uint64 and got.shape == (len(rows), 4)
  for row, words in zip(rows, got):
    want = np.random.SeedSequence([int(v) for v in row]).generate_state(
        4, np.uint64)
    np.testing.assert_array_equal(words, want)
  # Fewer words are padded as SeedSequence pads them.
  np.testing.assert_array_equal(
      streams.seed_states(np.array([[5, 6]], np.uint32))[0],
      np.random.SeedSequence([5, 6]).generate_state(4, np.uint64))
  with pytest.raises(ValueError, match='at most 4'):
    streams.seed_states(np.zeros((1, 5), np.uint32))


@pytest.mark.parametrize('seed,epoch', [(0, 0), (3, 1), (2 ** 32 - 1, 89),
                                        (2 ** 40, 2)])
def test_generators_draw_what_default_rng_draws(seed, epoch):
  # Past 2**32 SeedSequence reads a value as two words: default_rng itself.
  indices = [0, 1, 2, 1_281_166, 2 ** 32 - 1, 5]
  taken = 0
  for index, rng in zip(indices, streams.generators(seed, epoch, indices)):
    want = np.random.default_rng([seed, epoch, index])
    # The draws of a training example, then more of every kind.
    assert (augment.draw_train((256, 256), 227, rng)[:3]
            == augment.draw_train((256, 256), 227, want)[:3])
    np.testing.assert_array_equal(rng.normal(size=5), want.normal(size=5))
    np.testing.assert_array_equal(rng.integers(0, 2 ** 40, 4),
                                  want.integers(0, 2 ** 40, 4))
    assert rng.random() == want.random()
    taken += 1
  assert taken == len(indices)


def test_generators_refuse_negative_values():
  with pytest.raises(ValueError, match='>= 0'):
    next(streams.generators(0, 0, [3, -1]))
  assert list(streams.generators(0, 0, [])) == []


def test_lighting_colours_of_a_batch_are_each_examples_colour():
  rng = np.random.default_rng(1)
  eigval = np.array([0.2175, 0.0188, 0.0045])
  eigvec, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  alphas = rng.normal(0, 0.1, (64, 3))
  batch = augment.lighting_colours(alphas, eigval, eigvec)
  assert batch.dtype == np.float32 and batch.shape == (64, 3)
  for alpha, colour in zip(alphas, batch):
    np.testing.assert_array_equal(
        augment.lighting_colours(alpha[None], eigval, eigvec)[0], colour)
    # The paper's formula, written as the matrix product.
    np.testing.assert_allclose(colour, 255 * eigvec @ (alpha * eigval),
                               rtol=1e-6, atol=1e-4)
