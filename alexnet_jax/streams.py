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
`Batch` goes further and draws for the whole batch at once: it holds every
example's PCG64 state as NumPy uint64 halves, steps them together and turns
their outputs into integers, doubles and normals with NumPy's own algorithms
(Lemire's bounded integers, 53-bit doubles, the ziggurat), so that a batch's
draws hold the interpreter lock for a few hundred microseconds instead of a
few milliseconds. The rare draw that those algorithms finish by rejection
(about 2% of training examples) is redrawn by NumPy itself.
`tests/test_streams.py` checks every draw against `default_rng` itself.
"""

from __future__ import annotations

import functools
import warnings
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
_MASK52 = (1 << 52) - 1


def _hash_constants(initial: int, multiplier: int, count: int) -> list[int]:
  # The hash constant runs through the same values whatever the entropy, so
  # all examples share them.
  constants, value = [], initial
  for _ in range(count):
    constants.append(value)
    value = (value * multiplier) & _MASK32
  return constants


def _hash(values: np.ndarray, constants: np.ndarray) -> np.ndarray:
  """SeedSequence's hashmix of values [K, N], the k-th row with the k-th of
  K consecutive hash constants (constants: uint32 [K + 1])."""
  values = (values ^ constants[:-1, None]) * constants[1:, None]
  return values ^ (values >> np.uint32(16))


# The hash constants of every hashmix call, in call order: 4 for the entropy,
# then 3 for each of the 4 pool words mixed into the others; and the 8 of
# generate_state.
_MIXING = np.array(_hash_constants(_INIT_A, _MULT_A, _POOL_SIZE ** 2 + 1),
                   np.uint32)
_OUTPUT = np.array(_hash_constants(_INIT_B, _MULT_B, 9), np.uint32)


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
  with np.errstate(over='ignore'):  # uint32 arithmetic wraps, as intended
    # SeedSequence.mix_entropy: hash each word (zeros past the entropy),
    # then mix every pool word into every other. A word's hashes for the
    # three others are taken at once: it does not change while they mix.
    pool = np.zeros((_POOL_SIZE, count), np.uint32)
    pool[:words] = entropy.T
    pool = _hash(pool, _MIXING[:_POOL_SIZE + 1])
    calls = _POOL_SIZE
    for source in range(_POOL_SIZE):
      targets = [t for t in range(_POOL_SIZE) if t != source]
      hashed = _hash(np.broadcast_to(pool[source], (len(targets), count)),
                     _MIXING[calls:calls + len(targets) + 1])
      calls += len(targets)
      mixed = u32(_MIX_MULT_L) * pool[targets] - u32(_MIX_MULT_R) * hashed
      pool[targets] = mixed ^ (mixed >> u32(16))
    # generate_state(4, uint64): 8 words cycled from the pool, each hashed
    # with its own constant, paired little-endian into 4 uint64.
    state = _hash(pool[[i % _POOL_SIZE for i in range(8)]],
                  _OUTPUT).astype(np.uint64)
  return (state[0::2] | (state[1::2] << np.uint64(32))).T


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


def _check_values(seed: int, epoch: int, indices: np.ndarray) -> bool:
  """Whether every value is one SeedSequence word (below 2**32); raises on
  negative ones."""
  values = [int(seed), int(epoch)]
  if indices.size:
    values += [int(indices.min()), int(indices.max())]
  if min(values) < 0:
    raise ValueError(f'seed={seed}, epoch={epoch} and the indices must be '
                     '>= 0')
  return max(values) < 2 ** 32


def generators(seed: int, epoch: int, indices: Sequence[int]
               ) -> Iterator[np.random.Generator]:
  """For each index in turn, a generator in the state
  `np.random.default_rng([seed, epoch, index])` starts in.

  It is one generator, set again for each index: draw what the example
  needs before taking the next. Values of 2**32 or more (which SeedSequence
  reads as several words) take `default_rng` itself.
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  if not _check_values(seed, epoch, indices):
    for index in indices.tolist():
      yield np.random.default_rng([seed, epoch, index])
    return
  bit_generator = np.random.PCG64(0)  # its state is set for every index
  generator = np.random.Generator(bit_generator)
  for words in seed_states(_entropy(seed, epoch, indices)).tolist():
    bit_generator.state = pcg64_state(words)
    yield generator


def _entropy(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
  entropy = np.empty((len(indices), 3), np.uint32)
  entropy[:, 0], entropy[:, 1], entropy[:, 2] = seed, epoch, indices
  return entropy


# 128-bit arithmetic on pairs of uint64 arrays (high, low), wrapping as PCG's
# does.

_U64 = np.uint64
_LOW32 = _U64(0xFFFFFFFF)


def _halves(values) -> tuple[np.ndarray, np.ndarray]:
  """128-bit integers as (high, low) uint64 arrays of their shape."""
  values = np.asarray(values, object)
  return (np.asarray(values >> 64, np.uint64),
          np.asarray(values & ((1 << 64) - 1), np.uint64))


# Outputs are made this many at a time: the states k = 1..K steps on are
# s M^k + inc (1 + M + ... + M^(k-1)), all from s in one product each.
_BLOCK = 8
_JUMPS = _halves([[pow(_PCG_MULT, k, 1 << 128)]
                  for k in range(1, _BLOCK + 1)])
_SERIES = _halves([[sum(pow(_PCG_MULT, j, 1 << 128) for j in range(k))
                    & _MASK128] for k in range(1, _BLOCK + 1)])
_MULT = _halves(_PCG_MULT)


def _add(a_high, a_low, b_high, b_low):
  low = a_low + b_low
  return a_high + b_high + (low < a_low), low


def _multiply(high, low, m_high, m_low):
  """(high, low) * m modulo 2**128, for a constant m = (m_high, m_low)."""
  # The low halves' full 128-bit product from 32-bit pieces, then the two
  # cross terms, which only reach the high half.
  l0, l1 = low & _LOW32, low >> _U64(32)
  m0, m1 = m_low & _LOW32, m_low >> _U64(32)
  p00, p01, p10 = l0 * m0, l0 * m1, l1 * m0
  middle = (p00 >> _U64(32)) + (p01 & _LOW32) + (p10 & _LOW32)
  carry = (l1 * m1 + (p01 >> _U64(32)) + (p10 >> _U64(32))
           + (middle >> _U64(32)))
  return carry + low * m_high + high * m_low, low * m_low


class Batch:
  """The streams of a batch of examples, `default_rng([seed, epoch, index])`
  for each index, drawn from together: each method is the Generator method
  of the same name, for every example at once (values [N] or [N, size]).

  Draws follow NumPy's algorithms output for output; where one would reject
  an output and draw again, the example is marked in `unfinished` and its
  values from that draw on are not NumPy's: take them from
  `generator(n)` instead, which starts where example n's stream starts.
  Values past one SeedSequence word (2**32) are not batched (`batched` is
  False): every example then takes `generator(n)`.
  """

  def __init__(self, seed: int, epoch: int, indices: Sequence[int], *,
               verify: bool = True):
    self.seed, self.epoch = int(seed), int(epoch)
    self.indices = np.asarray(indices, np.int64).reshape(-1)
    # verify: whether the installed NumPy draws as this class does (checked
    # once per process); if it does not, every example takes generator(n).
    self.batched = (_check_values(seed, epoch, self.indices)
                    and (not verify or _draws_as_numpy()))
    self.unfinished = np.zeros(len(self.indices), bool)
    self._upper_halves = None  # PCG64's buffered 32 bits (has_uint32)
    self._outputs, self._taken = None, _BLOCK
    self._reused = None  # generator(n)'s
    if not self.batched:
      return
    self._words = seed_states(_entropy(seed, epoch, self.indices))
    w0, w1, w2, w3 = self._words.T
    # pcg64_state for every example at once: one step from inc + initial.
    self._increment = ((w2 << _U64(1)) | (w3 >> _U64(63)),
                       (w3 << _U64(1)) | _U64(1))
    state = _add(w0, w1, *self._increment)
    self._state = _add(*_multiply(*state, *_MULT), *self._increment)

  def __len__(self) -> int:
    return len(self.indices)

  def generator(self, n: int) -> np.random.Generator:
    """Example n's generator from the start of its stream: one generator,
    set again on each call, as `generators` gives them."""
    if not self.batched:
      return np.random.default_rng([self.seed, self.epoch,
                                    int(self.indices[n])])
    if self._reused is None:
      self._reused = np.random.Generator(np.random.PCG64(0))
    self._reused.bit_generator.state = pcg64_state(self._words[n].tolist())
    return self._reused

  def next_uint64(self) -> np.ndarray:
    """PCG64's next output (XSL-RR of the stepped state), uint64 [N]."""
    if not self.batched:
      raise ValueError('values past 2**32 are drawn by generator(n)')
    if self._taken == _BLOCK:
      states = _add(*_multiply(*self._state, *_JUMPS),
                    *_multiply(*self._increment, *_SERIES))
      self._state = states[0][-1], states[1][-1]
      high, low = states
      folded, rotation = high ^ low, high >> _U64(58)
      self._outputs = (folded >> rotation) | (
          folded << ((_U64(64) - rotation) & _U64(63)))
      self._taken = 0
    self._taken += 1
    return self._outputs[self._taken - 1]

  def next_uint32(self) -> np.ndarray:
    """The low half of an output, then its high half (PCG64's next32)."""
    if self._upper_halves is not None:
      upper, self._upper_halves = self._upper_halves, None
      return upper
    output = self.next_uint64()
    self._upper_halves = output >> _U64(32)
    return output & _LOW32

  def integers(self, low: int, high: int) -> np.ndarray:
    """Generator.integers(low, high) (int64): Lemire's multiply-and-shift
    on a 32-bit output. The rejection NumPy then makes, when the product's
    low word is below its threshold, is taken here as soon as it is below
    the range (a bound on the threshold)."""
    values = high - 1 - low
    if values < 0 or values >= 0xFFFFFFFF:
      raise ValueError(f'integers({low}, {high}): only 1 to 2**32 - 1 '
                       'values are batched')
    if values == 0:  # NumPy draws nothing for a single value
      return np.full(len(self), low, np.int64)
    scaled = self.next_uint32() * _U64(values + 1)
    self.unfinished |= (scaled & _LOW32) < _U64(values + 1)
    return (scaled >> _U64(32)).astype(np.int64) + low

  def random(self) -> np.ndarray:
    """Generator.random(): the output's top 53 bits over 2**53."""
    return ((self.next_uint64() >> _U64(11)).astype(np.float64)
            * (1.0 / 9007199254740992.0))

  def standard_normal(self) -> np.ndarray:
    """Generator.standard_normal(): the ziggurat's first try, which returns
    99.3% of the time; the rest are left unfinished."""
    widths, bounds = _ziggurat()
    output = self.next_uint64()
    layer = (output & _U64(0xFF)).astype(np.intp)
    output = output >> _U64(8)
    magnitude = (output >> _U64(1)) & _U64(_MASK52)
    x = magnitude.astype(np.float64) * widths[layer]
    self.unfinished |= magnitude >= bounds[layer]
    return np.where((output & _U64(1)).astype(bool), -x, x)

  def normal(self, loc: float, scale: float, size: int) -> np.ndarray:
    """Generator.normal(loc, scale, size), [N, size]: loc + scale * x."""
    return np.stack([loc + scale * self.standard_normal()
                     for _ in range(size)], axis=1)


@functools.cache
def _draws_as_numpy() -> bool:
  """Whether `Batch` draws what the installed NumPy's `default_rng` draws,
  on a batch that meets every method. Its algorithms are NumPy's own, kept
  stable across releases, but a NumPy that changed one would otherwise make
  different (still reproducible) inputs without a word."""
  indices = np.arange(64)
  batch = Batch(1, 2, indices, verify=False)
  drawn = np.stack([batch.integers(0, 30), batch.integers(0, 30),
                    batch.random(), batch.standard_normal(),
                    batch.standard_normal()], axis=1)
  for n in np.flatnonzero(~batch.unfinished):
    rng = np.random.default_rng([1, 2, int(indices[n])])
    want = [rng.integers(0, 30), rng.integers(0, 30), rng.random(),
            rng.standard_normal(), rng.standard_normal()]
    if not np.array_equal(drawn[n], want):
      warnings.warn('this NumPy draws differently from streams.Batch: each '
                    "example's draws are made by NumPy one at a time",
                    RuntimeWarning)
      return False
  return True


@functools.cache
def _ziggurat() -> tuple[np.ndarray, np.ndarray]:
  """NumPy's ziggurat tables for the standard normal, read off the installed
  NumPy itself rather than copied: (widths, bounds), float64 [256] and
  uint64 [256]. Its first try takes 64 random bits as (layer: 8, sign: 1,
  magnitude: 52) and returns magnitude * widths[layer] (negated by the sign
  bit) when magnitude < bounds[layer].

  Each is found by giving `standard_normal` chosen bits: a PCG64 state whose
  next output is exactly those bits (a stepped state whose high half is 0
  outputs its low half). Magnitude 1 gives the width itself; whether the
  first try returned (the generator took one step, not more) tells, by
  bisection, the smallest magnitude that does not: the bound.
  """
  bit_generator = np.random.PCG64(0)
  generator = np.random.Generator(bit_generator)
  back = pow(_PCG_MULT, -1, 1 << 128)  # the step, undone

  def first_try(bits: int) -> tuple[float, bool]:
    before = ((bits - 1) * back) & _MASK128  # increment 1
    bit_generator.state = {'bit_generator': 'PCG64',
                           'state': {'state': before, 'inc': 1},
                           'has_uint32': 0, 'uinteger': 0}
    x = generator.standard_normal()
    return x, bit_generator.state['state']['state'] == bits

  widths = np.zeros(256)
  bounds = np.zeros(256, np.uint64)  # 0: always left to NumPy
  for layer in range(256):
    width, returned = first_try(layer | (1 << 9))
    if not returned:
      continue
    widths[layer] = width
    # The first try returns for magnitudes below the bound: bisect for it.
    returns, fails = 1, 1 << 52
    while fails - returns > 1:
      middle = (returns + fails) // 2
      if first_try(layer | (middle << 9))[1]:
        returns = middle
      else:
        fails = middle
    bounds[layer] = fails
  return widths, bounds
