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


@pytest.mark.parametrize('seed,epoch', [(0, 0), (7, 89), (2 ** 32 - 1, 1)])
def test_batch_outputs_are_pcg64s(seed, epoch):
  indices = [0, 1, 5, 2 ** 32 - 1, 1_281_166]
  batch = streams.Batch(seed, epoch, indices)
  # More than one block of outputs, then a 32-bit pair.
  outputs = np.stack([batch.next_uint64() for _ in range(19)])
  low, high = batch.next_uint32(), batch.next_uint32()
  for n, index in enumerate(indices):
    want = np.random.default_rng([seed, epoch, index]).bit_generator
    np.testing.assert_array_equal(outputs[:, n], want.random_raw(19))
    last = int(want.random_raw())
    assert (int(low[n]), int(high[n])) == (last & 0xFFFFFFFF, last >> 32)


@pytest.mark.parametrize('shape,size,sigma', [((256, 256), 227, 0.1),
                                              ((64, 70), 64, 0.3),
                                              ((5, 5), 5, 0.1)])
def test_batch_draws_are_each_examples_draws(shape, size, sigma):
  # Enough examples that some meet NumPy's rejections (a normal outside the
  # ziggurat's first try, 1.2% of them) and take draw_train itself.
  indices = np.arange(40, 2040)
  batch = streams.Batch(3, 2, indices)
  top, left, reflected, alphas = augment.draw_train_batch(shape, size, batch,
                                                          sigma)
  assert 10 < batch.unfinished.sum() < 200
  assert top.dtype == left.dtype == np.int64 and reflected.dtype == bool
  assert alphas.shape == (len(indices), 3)
  for n, index in enumerate(indices):
    want = augment.draw_train(shape, size,
                              np.random.default_rng([3, 2, int(index)]), sigma)
    assert (top[n], left[n], reflected[n]) == want[:3], n
    np.testing.assert_array_equal(alphas[n], want[3])
  # Both halves of the image's range are met, and both reflections.
  assert top.max() == shape[0] - size and left.max() == shape[1] - size
  assert reflected.any() and not reflected.all()


def test_batch_past_one_word_takes_default_rng():
  batch = streams.Batch(2 ** 40, 0, [3, 4])
  assert not batch.batched
  top, left, reflected, alphas = augment.draw_train_batch((256, 256), 227,
                                                          batch)
  for n, index in enumerate([3, 4]):
    want = augment.draw_train((256, 256), 227,
                              np.random.default_rng([2 ** 40, 0, index]))
    assert (top[n], left[n], reflected[n]) == want[:3]
    np.testing.assert_array_equal(alphas[n], want[3])
  with pytest.raises(ValueError, match='generator'):
    batch.next_uint64()


def test_batch_refusals():
  with pytest.raises(ValueError, match='>= 0'):
    streams.Batch(0, -1, [0])
  with pytest.raises(ValueError, match='batched'):
    streams.Batch(0, 0, [0]).integers(0, 2 ** 33)
  with pytest.raises(ValueError, match='does not fit'):
    augment.draw_train_batch((64, 64), 65, streams.Batch(0, 0, [0]))


def test_batch_checks_the_installed_numpy(monkeypatch):
  assert streams._draws_as_numpy()  # this NumPy draws as Batch does
  # A NumPy whose ziggurat differed is noticed, and every example then takes
  # NumPy's own draws.
  widths, bounds = streams._ziggurat()
  monkeypatch.setattr(streams, '_ziggurat', lambda: (widths * 1.5, bounds))
  with pytest.warns(RuntimeWarning, match='draws differently'):
    assert not streams._draws_as_numpy.__wrapped__()
  monkeypatch.setattr(streams, '_draws_as_numpy', lambda: False)
  batch = streams.Batch(0, 0, [9])
  assert not batch.batched
  top, left, reflected, _ = augment.draw_train_batch((256, 256), 227, batch)
  want = augment.draw_train((256, 256), 227, np.random.default_rng([0, 0, 9]))
  assert (top[0], left[0], reflected[0]) == want[:3]
