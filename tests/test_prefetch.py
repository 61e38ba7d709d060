"""Device prefetch: the host's next batches are loaded and sent to the mesh
while the step runs, so a step costs the slower of the two, not their sum."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import parallel, train

BATCH = 8
# About as long as the step below takes on a CPU.
LOAD_SECONDS = 0.06
STEPS = 12


def _batch(number):
  return {'image': np.full((BATCH, 16, 16, 3), number % 256, np.uint8),
          'label': np.full(BATCH, number, np.int32)}


def _sleeping_loader(count):
  """Batches made as `imagenet.PreparedDataset` makes them, in a grain
  thread with two ready ahead, each taking LOAD_SECONDS of waiting instead
  of decoding."""
  import grain

  def make(number):
    time.sleep(LOAD_SECONDS)
    return _batch(number)

  return iter(grain.MapDataset.range(count).map(make).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def _step_of(seconds, scheme):
  """A jitted step of about `seconds` that reads its batch."""
  def step(state, batch, iterations):
    state = jax.lax.fori_loop(
        0, iterations, lambda _, x: jnp.tanh(x @ x.T * 1e-3 + 0.5), state)
    return state + batch['image'].astype(jnp.float32).mean()

  state = jnp.ones((256, 256))
  probe = jax.jit(step, static_argnums=2)
  batch = train.global_batch(scheme, _batch(0))
  jax.block_until_ready(probe(state, batch, 10))
  start = time.perf_counter()
  jax.block_until_ready(probe(state, batch, 10))
  per_iteration = (time.perf_counter() - start) / 10
  iterations = max(int(seconds / per_iteration), 1)
  return jax.jit(lambda s, b: step(s, b, iterations)), state


def test_batches_come_in_order_and_the_source_is_closed():
  closed = []

  def source():
    try:
      yield from range(5)
    finally:
      closed.append(True)

  assert list(train.prefetch_to_mesh(source(), lambda b: b * 10)) == [
      0, 10, 20, 30, 40]
  assert closed == [True]
  # Two ahead of the one the loop holds, no more.
  sent = []
  prefetched = train.prefetch_to_mesh(iter(range(10)), sent.append, depth=2)
  next(prefetched)
  assert len(sent) == 3
  prefetched.close()


def test_a_loader_as_slow_as_the_step_costs_the_step_only():
  scheme = parallel.make_scheme('data', jax.devices()[:2])
  to_mesh = lambda b: train.global_batch(scheme, b)
  step, state = _step_of(LOAD_SECONDS, scheme)
  jax.block_until_ready(step(state, to_mesh(_batch(0))))

  # One after the other: load, send, step, wait for the result.
  start = time.perf_counter()
  for number in range(STEPS):
    time.sleep(LOAD_SECONDS)
    state = step(state, to_mesh(_batch(number)))
    float(state[0, 0])
  serial = (time.perf_counter() - start) / STEPS
  step_seconds = serial - LOAD_SECONDS

  # As the training loop does it, still waiting for every step's result
  # (as its metrics are fetched when it logs every step).
  batches = train.prefetch_to_mesh(_sleeping_loader(STEPS + 4), to_mesh)
  state = step(state, next(batches))
  float(state[0, 0])
  start = time.perf_counter()
  for _ in range(STEPS):
    state = step(state, next(batches))
    float(state[0, 0])
  overlapped = (time.perf_counter() - start) / STEPS
  batches.close()

  slower = max(LOAD_SECONDS, step_seconds)
  assert overlapped <= 1.15 * slower, (
      f'{1e3 * overlapped:.1f} ms a step with a {1e3 * LOAD_SECONDS:.0f} ms '
      f'loader and a {1e3 * step_seconds:.1f} ms step (one after the other: '
      f'{1e3 * serial:.1f} ms)')
