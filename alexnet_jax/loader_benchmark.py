"""The training input pipeline alone: JPEG decoding plus the host's part of
section 4.1's augmentation (the patch, and each example's drawn values), in
images per second.

    python -m alexnet_jax.loader_benchmark --store=/tmp/fake --make_fake=2000
    python -m alexnet_jax.loader_benchmark --store=/data/store --workers=16

`--workers` decoding threads work in this process, or shared among
`--processes` worker processes. `benchmarks/input_peers.py` times the same
store's JPEGs through tf.data, a PyTorch DataLoader, a DALI pipeline and
each decoder alone.

`--make_fake=N` first writes a store of N synthetic 256x256 JPEGs (smooth
colour fields with fine noise, about the size of prepared ImageNet images,
in `prepare`'s form at quality 90), so the pipeline can be measured without
ImageNet. Prints images/s, images/s per worker and images per CPU-second
(what one busy core delivers, counted over this process and its worker
processes), then one JSON line.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import numpy as np
from absl import app, flags

from alexnet_jax import augment, imagenet, prepare, store, streams
from alexnet_jax.dataset import Batch

FLAGS = flags.FLAGS


def natural_image(rng: np.random.Generator, size: int = 256) -> np.ndarray:
  """Smooth colour fields at a few scales plus fine noise: JPEG sizes and
  decode times like a photograph's, unlike white noise or flat colour."""
  from PIL import Image
  image = np.zeros((size, size, 3), np.float32)
  for cells, weight in ((2, 0.5), (8, 0.3), (32, 0.2)):
    field = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    image += weight * np.asarray(Image.fromarray(field).resize(
        (size, size), Image.BICUBIC), np.float32)
  image += rng.normal(0, 6, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  """uint8 [H, W, 3] as `prepare` stores an image."""
  from PIL import Image
  return prepare.encode_jpeg(Image.fromarray(image), quality)


def write_fake_store(directory: str, num_train: int, num_eval: int, *,
                     num_classes: int = 10, size: int = 256,
                     quality: int = 90, shards: int = 2,
                     seed: int = 0) -> store.StoreInfo:
  """A complete store of synthetic images, labels `index mod num_classes`,
  with the training set's own statistics."""
  os.makedirs(directory, exist_ok=True)
  info = store.StoreInfo(name='fake', class_names=[f'class_{c}' for c in
                                                   range(num_classes)],
                         image_size=size, jpeg_quality=quality)
  pixel_sum = np.zeros((size, size, 3), np.float64)
  rgb_sum, rgb_outer, rgb_count = np.zeros(3), np.zeros((3, 3)), 0
  for split, count in (('train', num_train), ('validation', num_eval)):
    rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
    images = [natural_image(rng, size) for _ in range(count)]
    if split == 'train':
      for image in images:
        pixel_sum += image
        rgb = image.reshape(-1, 3) / 255.0
        rgb_sum += rgb.sum(0)
        rgb_outer += rgb.T @ rgb
        rgb_count += len(rgb)
    bounds = np.linspace(0, count, min(shards, count) + 1).astype(int)
    info.shards[split] = []
    for s, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
      name = store.shard_name(split, s)
      store.write_shard(os.path.join(directory, name), (
          store.encode_record(i % num_classes, encode_jpeg(images[i], quality))
          for i in range(begin, end)))
      info.shards[split].append(name)
    info.sizes[split] = count
  mean_rgb = rgb_sum / rgb_count
  covariance = rgb_outer / rgb_count - np.outer(mean_rgb, mean_rgb)
  eigval, eigvec = np.linalg.eigh(covariance)
  order = np.argsort(eigval)[::-1]
  store.Statistics(mean_rgb=255 * mean_rgb, eigval=eigval[order],
                   eigvec=eigvec[:, order],
                   mean_image=pixel_sum / max(num_train, 1)).save(directory)
  info.complete = True
  info.save(directory)
  return info


def _cpu_seconds(root: int) -> float:
  """User + system time of `root` and its descendants that are alive now."""
  tick = os.sysconf('SC_CLK_TCK')
  parents, times = {}, {}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    parents[int(entry)] = int(fields[1])
    times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
  total, frontier = 0.0, [root]
  while frontier:
    pid = frontier.pop()
    total += times.get(pid, 0.0)
    frontier += [child for child, parent in parents.items() if parent == pid]
  return total


def bytes_to_device_per_image(local: Batch) -> float:
  """What a host batch sends to the accelerator, per example."""
  sent = [v for k, v in local.items() if k != 'skipped']
  return sum(v.nbytes for v in sent) / len(local['label'])


class Pipeline:
  """A config's training input on a prepared store, built as the training
  loop builds it: for a benchmark of the loader alone (`host_batches`),
  the step alone (one device batch, reused) and both (`device_batches`).

    pipeline = Pipeline(config, store_dir, scheme)
    train_step(state, batch, lr, rng, pipeline.constants)
  """

  def __init__(self, config, store_dir: str, scheme):
    from alexnet_jax import train, validation
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.store_dir = store_dir
    self.config = config
    self.scheme = scheme
    self.dataset = imagenet.PreparedDataset.from_config(
        config, validation.image_size(config))
    self.rows = train.process_rows(scheme, config.batch_size)
    self.constants = train.device_constants(scheme, self.dataset)

  def host_batches(self, start_step: int = 0):
    """This process's rows of each training batch, NumPy, from the grain
    pipeline."""
    return self.dataset.train_batches(
        batch_size=self.config.batch_size, seed=self.config.seed,
        start_step=start_step, rows=self.rows)

  def to_mesh(self, local: Batch) -> dict:
    from alexnet_jax import train
    local = {k: v for k, v in local.items() if k != 'skipped'}
    return train.global_batch(self.scheme, local, self.config.batch_size)

  def device_batches(self, start_step: int = 0):
    """Global batches on the mesh, two transfers ahead, as training gets
    them."""
    from alexnet_jax import train
    return train.prefetch_to_mesh(self.host_batches(start_step),
                                  self.to_mesh)


def run_benchmark(store_dir: str, *, workers: int, processes: int,
                  prefetch: int, batch_size: int, steps: int, warmup: int,
                  image_size: int, decoder: str | None) -> dict:
  dataset = imagenet.PreparedDataset(store_dir, image_size, workers=workers,
                                     processes=processes, prefetch=prefetch,
                                     decoder=decoder)
  batches = dataset.train_batches(batch_size=batch_size, seed=0)
  # At least as many batches as can be in flight (threads, prefetch, the
  # one held here), so that the timed ones reuse the buffer pool's memory,
  # as every batch of a long run does.
  for _ in range(max(warmup, dataset.threads + prefetch + 2)):
    next(batches)
  cpu_start, start = _cpu_seconds(os.getpid()), time.perf_counter()
  for _ in range(steps):
    batch = next(batches)
  elapsed = time.perf_counter() - start
  cpu = _cpu_seconds(os.getpid()) - cpu_start
  batches.close()
  images = steps * batch_size
  assert batch['image'].shape == (batch_size, image_size, image_size, 3)
  return {'images_per_sec': images / elapsed,
          'bytes_to_device_per_image': bytes_to_device_per_image(batch),
          'images_per_sec_per_worker': images / elapsed / dataset.workers,
          'images_per_cpu_sec': images / cpu if cpu > 0 else float('nan'),
          'cpu_seconds': cpu, 'seconds': elapsed, 'workers': dataset.workers,
          'processes': processes, 'threads_per_process': dataset.threads,
          'batch_size': batch_size, 'steps': steps,
          'image_size': image_size, 'decoder': dataset.decoder,
          'cores': len(os.sched_getaffinity(0)), 'num_train': dataset.num_train}


def time_stages(store_dir: str, *, image_size: int, decoder: str | None,
                images: int = 1024, batch_size: int = 128) -> dict:
  """Microseconds per image of each stage of a training example, in one
  thread, in the loader's order: reading the record, decoding it, drawing
  the example's values, copying its patch into a batch; then the whole
  example as the loader makes it (`PreparedDataset._train_examples`), whose
  excess over the stages is the loop's own bookkeeping."""
  # pylint: disable=protected-access
  dataset = imagenet.PreparedDataset(store_dir, image_size, workers=1,
                                     decoder=decoder)
  count = min(images, dataset.num_train)
  stored = dataset.stored_shape
  decoded = np.empty(stored, np.uint8)
  batch = np.empty((batch_size, image_size, image_size, 3), np.uint8)
  margin = (stored[0] - image_size) // 2
  stages = {}

  def timed(name, fn):
    # Each stage runs once untimed first: its first pass faults in the
    # memory it writes (the batch arrays), which a long run's reused
    # buffers do not, and which costs as much as the stage itself on some
    # machines.
    fn()
    start = time.perf_counter()
    result = fn()
    stages[name] = (time.perf_counter() - start) / count * 1e6
    return result

  def read():
    for i in range(count):  # each dropped, as the loader drops it
      dataset._train[i]  # pylint: disable=pointless-statement
  timed('record read', read)
  records = [dataset._train[i] for i in range(count)]
  timed('decode', lambda: [dataset._decode_into(jpeg, decoded)
                           for _, jpeg in records])

  timed('draws', lambda: _draws(dataset, range(count)))

  def copy_patches():
    for i in range(count):
      batch[i % batch_size] = decoded[margin:margin + image_size,
                                      margin:margin + image_size]
  timed('patch copy', copy_patches)

  def whole_examples():
    # Each batch dropped before the next, so the buffer pool hands its
    # memory out again, as in a long run.
    for start in range(0, count, batch_size):
      dataset._train_examples(np.arange(start, min(start + batch_size,
                                                   count)))
  timed('whole example', whole_examples)
  return stages


# The stages a training example adds to its decode, in the loader's order;
# `time_added_stages` adds them one at a time.
ADDED_STAGES = ('read', 'draws', 'copy')


def time_added_stages(store_dir: str, stages: tuple[str, ...], *,
                      threads: int, image_size: int, decoder: str | None,
                      batch_size: int = 128, batches: int = 16) -> float:
  """images/s of the loader's own loop reduced to decoding plus `stages`
  (some of ADDED_STAGES), in `threads` threads that each make whole
  batches, as the loader's threads do.

  Without 'read' the JPEGs come from memory, read before timing; without
  'draws' every patch is the centre one; without 'copy' no patch is cut.
  Against the decoder alone in as many threads, the rates with one, two
  and three stages added say what each stage costs at that thread count,
  the cost of sharing the interpreter lock with the other threads
  included, which `time_stages` (one thread, each stage alone) cannot show.
  What the loader adds beyond all three (grain, the batch's other fields,
  the retry on records that do not decode) is the rest of its shortfall.
  """
  # pylint: disable=protected-access
  unknown = set(stages) - set(ADDED_STAGES)
  if unknown:
    raise ValueError(f'stages {sorted(unknown)}: not in {ADDED_STAGES}')
  dataset = imagenet.PreparedDataset(store_dir, image_size, workers=threads,
                                     decoder=decoder)
  source, stored = dataset._train, dataset.stored_shape
  # The records the timed batches use, no more: a whole ImageNet store
  # would not fit in memory.
  count = min(len(source), (threads + batches) * batch_size)
  in_memory = (None if 'read' in stages else
               [bytes(source[i][1]) for i in range(count)])
  centre = augment.center_position(stored[0], stored[1], image_size)

  def make_batch(number: int) -> None:
    indices = [(number * batch_size + k) % count for k in range(batch_size)]
    offsets = (_draws(dataset, indices)
               if 'draws' in stages else [centre] * batch_size)
    if 'copy' in stages:
      images, decoded_at = dataset._train_arrays(batch_size, shared=False)
    else:
      images, scratch = None, imagenet._scratch(stored)
      decoded_at = lambda n: scratch
    for n, index in enumerate(indices):
      jpeg = source[index][1] if in_memory is None else in_memory[index]
      decoded = decoded_at(n)
      dataset._decode_into(jpeg, decoded)
      if images is not None:
        top, left = offsets[n]
        images[n] = decoded[top:top + image_size, left:left + image_size]

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    # One batch per thread first: the threads start and the batch arrays
    # are faulted in, as in a long run.
    list(pool.map(make_batch, range(threads)))
    start = time.perf_counter()
    list(pool.map(make_batch, range(threads, threads + batches)))
    return batches * batch_size / (time.perf_counter() - start)


def _draws(dataset: imagenet.PreparedDataset, indices) -> list:
  """The examples' (top, left) patch positions, drawn with their reflections
  and lighting colours as the loader draws them."""
  top, left, _, alphas = augment.draw_train_batch(
      dataset.stored_shape[:2], dataset.image_size,
      streams.Batch(0, 0, indices), dataset.lighting_sigma)
  augment.lighting_colours(alphas, dataset.eigval, dataset.eigvec)
  return list(zip(top.tolist(), left.tolist()))


def check_store_flag(directory: str, *,
                     instead: str = 'give --make_fake=N to write N '
                     'synthetic JPEGs there') -> None:
  """A usage error, saying what to run (prepare, or `instead`), where
  `--store` holds no prepared training split: this module's command,
  alexnet_jax.benchmark's and benchmarks/input_peers.py."""
  try:
    store.check_store(directory, splits=('train',))
  except store.StoreError as e:
    raise app.UsageError(f'{e} Or {instead}.') from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.make_fake:
    start = time.perf_counter()
    write_fake_store(FLAGS.store, FLAGS.make_fake,
                     max(FLAGS.make_fake // 50, 1))
    print(f'wrote {FLAGS.make_fake} synthetic JPEGs to {FLAGS.store} in '
          f'{time.perf_counter() - start:.1f} s')
  check_store_flag(FLAGS.store)
  result = run_benchmark(
      FLAGS.store, workers=FLAGS.workers, processes=FLAGS.processes,
      prefetch=FLAGS.prefetch, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
      warmup=FLAGS.warmup, image_size=FLAGS.image_size, decoder=FLAGS.decoder)
  where = (f"in {FLAGS.processes} process(es)" if FLAGS.processes
           else 'in this process')
  print(f"{result['images_per_sec']:.0f} images/s with {result['workers']} "
        f"worker thread(s) {where} on {result['cores']} cores: "
        f"{result['images_per_sec_per_worker']:.0f} images/s per worker, "
        f"{result['images_per_cpu_sec']:.0f} images per CPU-second")
  if FLAGS.stages:
    stages = time_stages(FLAGS.store, image_size=FLAGS.image_size,
                         decoder=FLAGS.decoder)
    whole = stages['whole example']
    for name, us in stages.items():
      print(f'{name:>14}: {us:6.1f} us per image, {100 * us / whole:3.0f}% '
            'of the whole example (one thread)')
    result['stages_us_per_image'] = stages
  print(json.dumps(result))


def define_flags():
  # Defined by the programs that use them (this module's, and
  # benchmarks/input_peers.py), not on import: alexnet_jax.benchmark imports
  # this module for the pipeline and has flags of the same names.
  flags.DEFINE_string('store', None, 'A prepared store directory.')
  flags.DEFINE_integer('make_fake', 0, 'First write a synthetic store of this '
                       'many training images into --store.')
  flags.DEFINE_integer('workers', 1, 'Decoding threads in all (-1: one per '
                       'core).')
  flags.DEFINE_integer('processes', 0, 'Worker processes sharing them (0: all '
                       'in this process).')
  flags.DEFINE_integer('prefetch', 2, 'Batches buffered per process.')
  flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
  flags.DEFINE_integer('steps', 50, 'Batches timed.')
  flags.DEFINE_integer('warmup', 3, 'Batches read before timing (worker '
                       'start).')
  flags.DEFINE_integer('image_size', 227, 'The network input (227 or 224).')
  flags.DEFINE_enum('decoder', None, imagenet.DECODERS, 'JPEG decoder '
                    '(default: simplejpeg where installed, else Pillow).')
  flags.DEFINE_bool('stages', False, 'Also time each stage of a training '
                    'example in one thread (time_stages).')
  flags.mark_flag_as_required('store')


if __name__ == '__main__':
  define_flags()
  app.run(main)
