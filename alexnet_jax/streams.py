"""Each training example's random stream, made for a whole batch at once.

Every example draws its crop, reflection and lighting from its own
generator, `np.random.default_rng([seed, epoch, index])`, so that what it
gets depends neither on the thread, process or batch that makes it nor on
where a run resumed. Building such a generator costs more than the draws
themselves, mostly in NumPy's Python-level seeding (SeedSequence's hashing,
PCG64's set-up), which holds the interpreter lock: with two decoding
threads, time the other thread cannot use.

`generators` gives the same streams for a batch of indices. It computes the
SeedSequence hash of every example at once with NumPy's uint32 arithmetic
(the algorithm of `numpy.random.SeedSequence`, whose output NumPy keeps
stable across releases), derives PCG64's 128-bit state from it as
`numpy.random.PCG64` does, and sets that state into one reused generator.
`tests/test_streams.py` checks every draw against `default_rng` itself.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

# numpy.random.SeedSequence's hashing constants (the pool is 4 words).
_POOL_SIZE = 4
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_MASK32 = 0xFFFFFFFF
# PCG64's LCG multiplier (PCG_DEFAULT_MULTIPLIER_128).
_PCG_MULT = (2549297995355413924 << 64) | 4865540595714422341
_MASK128 = (1 << 128) - 1


def _hash_constants(initial: int, multiplier: int, count: int) -> list[int]:
  # The hash constant runs through the same values whatever the entropy, so
  # all examples share them.
  constants, value = [], initial
  for _ in range(count):
    constants.append(value)
    value = (value * multiplier) & _MASK32
  return constants


def seed_states(entropy: np.ndarray) -> np.ndarray:
  """`SeedSequence(row).generate_state(4, np.uint64)` for every row.

  entropy: uint32 [N, W], W <= 4: each example's words (seed, epoch, index).
  Returns uint64 [N, 4].
  """
  entropy = np.asarray(entropy, np.uint32)
  count, words = entropy.shape
  if words > _POOL_SIZE:
    raise ValueError(f'{words} entropy words; at most {_POOL_SIZE}')
  u32 = np.uint32
  # The k-th hash XORs with the k-th constant and multiplies by the next.
  mixing = _hash_constants(_INIT_A, _MULT_A, _POOL_SIZE ** 2 + 1)
  calls = 0

  def hashmix(value):
    nonlocal calls
    value = (value ^ u32(mixing[calls])) * u32(mixing[calls + 1])
    calls += 1
    return value ^ (value >> u32(16))

  def mix(x, y):
    result = u32(_MIX_MULT_L) * x - u32(_MIX_MULT_R) * y
    return result ^ (result >> u32(16))

  with np.errstate(over='ignore'):  # uint32 arithmetic wraps, as intended
    # SeedSequence.mix_entropy: hash each word (zeros past the entropy),
    # then mix every pool word into every other.
    zeros = np.zeros(count, np.uint32)
    pool = [hashmix(entropy[:, i] if i < words else zeros)
            for i in range(_POOL_SIZE)]
    for source in range(_POOL_SIZE):
      for target in range(_POOL_SIZE):
        if source != target:
          pool[target] = mix(pool[target], hashmix(pool[source]))
    # generate_state(4, uint64): 8 words cycled from the pool, each hashed
    # with its own constant, paired little-endian into 4 uint64.
    output = _hash_constants(_INIT_B, _MULT_B, 9)
    state = np.empty((count, 8), np.uint64)
    for i in range(8):
      value = ((pool[i % _POOL_SIZE] ^ u32(output[i]))
               * u32(output[i + 1]))
      state[:, i] = value ^ (value >> u32(16))
  return state[:, 0::2] | (state[:, 1::2] << np.uint64(32))


def pcg64_state(words: Sequence[int]) -> dict:
  """`PCG64(seed_sequence).state` for the 4 words of its
  `generate_state(4, np.uint64)`: PCG's srandom with the first two words as
  the initial state and the last two as the stream."""
  initial = (words[0] << 64) | words[1]
  increment = ((((words[2] << 64) | words[3]) << 1) | 1) & _MASK128
  # state = 0; step; state += initial; step (step: state * mult + inc).
  state = ((increment + initial) * _PCG_MULT + increment) & _MASK128
  return {'bit_generator': 'PCG64',
          'state': {'state': state, 'inc': increment},
          'has_uint32': 0, 'uinteger': 0}


def generators(seed: int, epoch: int, indices: Sequence[int]
               ) -> Iterator[np.random.Generator]:
  """For each index in turn, a generator in the state
  `np.random.default_rng([seed, epoch, index])` starts in.

  It is one generator, set again for each index: draw what the example
  needs before taking the next. Values of 2**32 or more (which SeedSequence
  reads as several words) take `default_rng` itself.
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  values = [int(seed), int(epoch)]
  if indices.size:
    values += [int(indices.min()), int(indices.max())]
  if min(values) < 0:
    raise ValueError(f'seed={seed}, epoch={epoch} and the indices must be '
                     '>= 0')
  if max(values) >= 2 ** 32:
    for index in indices.tolist():
      yield np.random.default_rng([seed, epoch, index])
    return
  entropy = np.empty((len(indices), 3), np.uint32)
  entropy[:, 0], entropy[:, 1], entropy[:, 2] = seed, epoch, indices
  bit_generator = np.random.PCG64(0)  # its state is set for every index
  generator = np.random.Generator(bit_generator)
  for words in seed_states(entropy).tolist():
    bit_generator.state = pcg64_state(words)
    yield generator
