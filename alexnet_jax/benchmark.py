"""The train step alone, timed: the throughput of the compute, without input.

    python -m alexnet_jax.benchmark --config=configs/one_gpu.py:synthetic \\
        --steps=5
    python -m alexnet_jax.benchmark --config=configs/one_gpu.py \\
        --config.model.dtype=bfloat16 --config.batch_size=512 --steps=50

runs the project's own step (`train.make_train_step`, any scheme, any batch
size, any `--config.FIELD`) on one batch of synthetic images of the config's
shape that stays on the device: forward, loss, backward, gradient sums and the
SGD update, the state donated from step to step as in training. It compiles
ahead of time (timed), warms up, then times `--steps` steps, each from the
completion of the one before while the next is already queued, so the device
never waits for the host. Prints images/s and ms per step (median, with the
fastest and slowest step), the compile time, the peak accelerator memory
(where the backend reports it), the model FLOPs per image (`alexnet_jax.flops`),
MFU and the bytes sent to the device per image; the last line is one JSON
object with all of them.

MFU is images/s x FLOPs per image over the devices' peak: `--peak_tflops`, or
PEAK_TFLOPS for a known accelerator; elsewhere (a CPU) it is null.

    python -m alexnet_jax.benchmark --config=configs/two_gpu.py \
        --input=pipeline [--store=STORE | --make_fake=N]

feeds the step from a prepared store's input pipeline instead (a fake store
of N synthetic 256x256 JPEGs without --store) and also prints the images/s
of the input pipeline alone and of the two together, as training runs them.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from alexnet_jax import metrics_io, runtime

# Dense (no sparsity) peak TFLOP/s per device for the compute dtype: bfloat16
# on the tensor cores, and TF32 for float32 (XLA's default precision runs
# float32 convolutions and matmuls in TF32 on these GPUs). NVIDIA's datasheets
# quote the sparse figures, twice these: H100 and H200 Tensor Core GPU
# datasheets (SXM: BF16 1,979, TF32 989; H100 PCIe: 1,513 and 756; NVL:
# 1,671 and 835) and the A100 datasheet (BF16 312, TF32 156, dense). Matched
# in order against jax's device_kind.
PEAK_TFLOPS = (
    ('H100 PCIe', {'bfloat16': 756.5, 'float32': 378.0}),
    ('H100 NVL', {'bfloat16': 835.5, 'float32': 417.5}),
    ('H200 NVL', {'bfloat16': 835.5, 'float32': 417.5}),
    ('H100', {'bfloat16': 989.5, 'float32': 494.5}),
    ('H200', {'bfloat16': 989.5, 'float32': 494.5}),
    ('A100', {'bfloat16': 312.0, 'float32': 156.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The table's peak for one device of this kind, or None if unknown."""
  for name, peaks in PEAK_TFLOPS:
    if name in device_kind:
      return peaks.get(dtype)
  return None


def peak_memory_bytes(devices) -> int | None:
  """The largest peak of memory in use over `devices`; None where the backend
  keeps no statistics (the CPU)."""
  peaks = []
  for device in devices:
    stats = device.memory_stats()
    if not stats or 'peak_bytes_in_use' not in stats:
      return None
    peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def measure(config, *, steps: int = 20, warmup: int = 3,
            peak: float | None = None, store_dir: str | None = None) -> dict:
  """Compiles and times `config`'s train step; returns the figures.

  `peak`: TFLOP/s per device for MFU, instead of the PEAK_TFLOPS entry.
  `store_dir`: a prepared store whose input pipeline feeds the step, timed
  alone, the step alone (on one of its batches) and the two together.
  """
  import jax
  from alexnet_jax import validation
  validation.check_config(config)
  if steps < 1 or warmup < 0:
    raise validation.ConfigError(
        f'steps={steps} must be positive and warmup={warmup} non-negative')
  with jax.enable_x64(config.model.dtype == 'float64'):
    return _measure(config, steps, warmup, peak, store_dir)


def compiled_step(config, store_dir: str | None = None) -> dict:
  """`config`'s train step compiled for one batch, with what it runs on:
  {'step', 'state', 'batch', 'constants', 'lr', 'rng', 'compile_s', 'model',
  'devices', 'image_size', 'bytes_per_image', 'pipeline'}. The batch is
  synthetic, or the first of `store_dir`'s input pipeline
  (`loader_benchmark.Pipeline`, then under 'pipeline')."""
  import jax
  from alexnet_jax import data, models, optim, parallel, train
  from alexnet_jax import validation
  devices = train.select_devices(config)
  scheme = parallel.make_scheme(config.parallelism, devices,
                                tuple(config.mesh_shape))
  validation.check_layout(config, scheme, jax.process_count())
  image_size = validation.image_size(config)
  model = models.from_config(config)
  tx = optim.make_optimizer(config)
  state, shardings = train.create_train_state(model, tx, scheme, image_size,
                                              config.seed)
  lr_multipliers = optim.step_lr_multipliers(config, state['params'])
  train_step = train.make_train_step(model, tx, scheme, shardings,
                                     lr_multipliers)

  from alexnet_jax import loader_benchmark
  batch_size = config.batch_size
  pipeline, constants = None, None
  if store_dir is None:
    rows = train.process_rows(scheme, batch_size)
    source = data.Synthetic(image_size, config.model.num_classes, batch_size,
                            1)
    local = next(source.train_batches(batch_size=batch_size, seed=config.seed,
                                      rows=rows))
    batch = train.global_batch(scheme, local, batch_size)
  else:
    pipeline = loader_benchmark.Pipeline(config, store_dir, scheme)
    host = pipeline.host_batches()
    local = next(host)
    host.close()
    batch, constants = pipeline.to_mesh(local), pipeline.constants
  bytes_per_image = loader_benchmark.bytes_to_device_per_image(local)
  lr = float(config.optimizer.learning_rate)
  rng = jax.random.key(config.seed + 1)
  jax.block_until_ready((state, batch))
  start = time.perf_counter()
  compiled = train_step.lower(state, batch, lr, rng, constants).compile()
  return {'step': compiled, 'state': state, 'batch': batch,
          'constants': constants, 'lr': lr, 'rng': rng,
          'compile_s': time.perf_counter() - start, 'model': model,
          'devices': devices, 'image_size': image_size,
          'bytes_per_image': bytes_per_image, 'pipeline': pipeline}


def _measure(config, steps: int, warmup: int, peak: float | None,
             store_dir: str | None) -> dict:
  import jax
  from alexnet_jax import flops, models
  built = compiled_step(config, store_dir)
  constants = built['constants']
  step_fn = lambda state, batch, lr, rng: built['step'](state, batch, lr, rng,
                                                        constants)
  compiled, state, batch, lr = (step_fn, built['state'], built['batch'],
                                built['lr'])
  model, devices, image_size = (built['model'], built['devices'],
                                built['image_size'])
  batch_size = config.batch_size
  rngs = [jax.random.fold_in(built['rng'], i) for i in range(warmup + steps)]
  compile_s, bytes_per_image = built['compile_s'], built['bytes_per_image']

  for rng in rngs[:warmup]:
    state, metrics = compiled(state, batch, lr, rng)
  jax.block_until_ready(state)
  # One step always queued behind the one being waited for: the interval
  # between two completions is one step of device time. The metrics are
  # waited on, not the state, which the next step has already taken.
  times = []
  last = time.perf_counter()
  pending = None
  for rng in rngs[warmup:warmup + steps]:
    state, metrics = compiled(state, batch, lr, rng)
    if pending is not None:
      jax.block_until_ready(pending)
      now = time.perf_counter()
      times.append(now - last)
      last = now
    pending = metrics
  jax.block_until_ready((state, pending))
  times.append(time.perf_counter() - last)
  loss = float(jax.device_get(pending['loss']))
  pipeline = built['pipeline']
  rates = {}
  if pipeline is not None:
    rates['loader_img_per_s'] = _loader_rate(pipeline, steps, warmup)
    rates['end_to_end_img_per_s'], state = _end_to_end_rate(
        pipeline, compiled, state, lr, built['rng'], steps, warmup)

  step_s = statistics.median(times)
  img_per_s = batch_size / step_s
  flops_per_image = flops.training_flops(model, image_size)
  device_kind = devices[0].device_kind
  peak = peak or peak_tflops(device_kind, config.model.dtype)
  mfu = (img_per_s * flops_per_image / (peak * 1e12 * len(devices))
         if peak else None)
  return {
      'variant': config.model.variant,
      'parallelism': config.parallelism,
      'devices': len(devices),
      'platform': devices[0].platform,
      'device_kind': device_kind,
      'dtype': config.model.dtype,
      **{field: models.lowering(field, getattr(model, field),
                                devices[0].platform)
         for field in models.LOWERINGS},
      'batch_size': batch_size,
      'image_size': image_size,
      'steps': steps,
      'img_per_s': img_per_s,
      'step_ms': 1e3 * step_s,
      'step_ms_min': 1e3 * min(times),
      'step_ms_max': 1e3 * max(times),
      'compile_s': compile_s,
      'peak_memory_bytes': peak_memory_bytes(devices),
      'flops_per_image': flops_per_image,
      'peak_tflops_per_device': peak,
      'mfu': mfu,
      'bytes_to_device_per_image': bytes_per_image,
      'final_loss': loss,
      'input': 'synthetic' if pipeline is None else 'pipeline',
      **rates,
  }


def _loader_rate(pipeline, steps: int, warmup: int) -> float:
  """Images/s of the host input pipeline alone, once it has started."""
  host = pipeline.host_batches()
  try:
    for _ in range(warmup + 1):
      next(host)
    start = time.perf_counter()
    for _ in range(steps):
      next(host)
    return steps * pipeline.config.batch_size / (time.perf_counter() - start)
  finally:
    host.close()


def _end_to_end_rate(pipeline, step, state, lr, rng, steps: int,
                     warmup: int):
  """(images/s of the step fed by the pipeline as training feeds it, the
  state after it)."""
  import jax
  batches = pipeline.device_batches()
  try:
    for _ in range(warmup + 1):
      state, metrics = step(state, next(batches), lr, rng)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, next(batches), lr, rng)
    jax.block_until_ready(metrics)
    rate = steps * pipeline.config.batch_size / (time.perf_counter() - start)
    return rate, state
  finally:
    batches.close()


def format_result(r: dict) -> str:
  memory = ('not reported' if r['peak_memory_bytes'] is None
            else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB")
  mfu = ('null (no known peak for this device)' if r['mfu'] is None
         else f"{100 * r['mfu']:.1f}% of {r['peak_tflops_per_device']:g} "
         'TFLOP/s per device')
  return '\n'.join([
      f"{r['variant']} {r['parallelism']} on {r['devices']} "
      f"{r['device_kind']}, {r['dtype']}, conv1 {r['conv1']}, grouped "
      f"convolutions {r['grouped_conv']}, pooling {r['pooling']}, batch "
      f"{r['batch_size']} of {r['image_size']}x{r['image_size']}",
      f"images/s       {r['img_per_s']:,.1f}",
      f"ms per step    {r['step_ms']:.2f} median of {r['steps']} "
      f"({r['step_ms_min']:.2f} - {r['step_ms_max']:.2f})",
      f"compile        {r['compile_s']:.1f} s",
      f'peak memory    {memory}',
      f"FLOPs/image    {r['flops_per_image'] / 1e9:.3f} G (training)",
      f'MFU            {mfu}',
      f"to device      {r['bytes_to_device_per_image']:,.0f} bytes per image",
  ] + ([f"input alone    {r['loader_img_per_s']:,.1f} images/s",
        f"step alone     {r['img_per_s']:,.1f} images/s",
        f"end to end     {r['end_to_end_img_per_s']:,.1f} images/s"]
       if r['input'] == 'pipeline' else []))


def _fake_store(directory: str, config) -> str:
  from alexnet_jax import loader_benchmark
  count = flags.FLAGS.make_fake
  loader_benchmark.write_fake_store(directory, count, max(count // 50, 1),
                                    num_classes=config.model.num_classes)
  return directory


def _define_flags():
  # Defined only when this module is the program, as alexnet_jax.comm does.
  config_flags.DEFINE_config_file('config', None, 'A configs/*.py file, '
                                  'optionally with :ARG (digits, synthetic).',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 20, 'Steps timed.', lower_bound=1)
  flags.DEFINE_integer('warmup', 3, 'Steps run after compiling, untimed.',
                       lower_bound=0)
  flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s of one device for '
                     'MFU, instead of the table of known accelerators.')
  flags.DEFINE_enum('input', 'synthetic', ['synthetic', 'pipeline'],
                    "'synthetic': one batch kept on the device; 'pipeline': "
                    'the input pipeline of a prepared store (--store, or a '
                    'fake one of --make_fake images) timed alone, then '
                    'feeding the step.')
  flags.DEFINE_string('store', None, 'A prepared store for --input=pipeline.')
  flags.DEFINE_integer('make_fake', 1024, 'Without --store: the size of the '
                       'fake store of 256x256 JPEGs made for '
                       '--input=pipeline.', lower_bound=1)
  flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS
  config = FLAGS.config
  metrics_io.quiet_library_logs()
  runtime.setup(config)  # simulated CPU devices, before JAX starts
  from alexnet_jax import validation
  if FLAGS.input == 'pipeline' and FLAGS.store:
    # Before compiling the step: a wrong path should not wait for it.
    from alexnet_jax import loader_benchmark
    loader_benchmark.check_store_flag(
        FLAGS.store, instead='leave out --store to time a fake store of '
        '--make_fake images')
  with tempfile.TemporaryDirectory() as fake:
    store_dir = None
    if FLAGS.input == 'pipeline':
      store_dir = FLAGS.store or _fake_store(fake, config)
    try:
      result = measure(config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                       peak=FLAGS.peak_tflops, store_dir=store_dir)
    except validation.ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)
  print(format_result(result))
  print(json.dumps(result))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
