"""ImageNet (or any prepared image folder) from the prepared store, via grain.

The store (see `store.py`) holds the paper's 256x256 images as JPEGs. This
module decodes them and does the host's part of section 4.1's augmentation
without TensorFlow: it draws each example's values and cuts the uint8 patch;
the accelerator does the rest (`device_augment.py`, with the constants in
`preprocessing`). Evaluation ships the decoded 256x256 image itself, once,
and the accelerator cuts the centre patch or the ten. Parallelised with
grain: a `MapDataset` whose elements are whole batches, indexed by the
training step, made by `workers` threads in this process or, with
`processes > 0`, shared among that many worker processes, which build their
batches directly in shared memory.

What a batch holds depends only on (seed, step, rows):
  * step s holds positions [p B, (p + 1) B) of `epoch_order(seed, e)`, where
    e, p = divmod(s, steps_per_epoch) and B is the global batch, so the step
    number is the whole input state: a run resumed at step s reads what an
    uninterrupted run reads;
  * every example's crop, reflection and lighting come from its own generator,
    `np.random.default_rng([seed, e, example_index])`, so they depend neither
    on the worker, thread or process that makes it nor on where the run
    resumed;
  * each process makes only the rows [first, last) of each global batch that
    its devices hold.

Worker processes are started with 'spawn': a script that uses them must
guard its entry point with `if __name__ == '__main__':` (absl's `app.run`
mains do).
"""

from __future__ import annotations

import io
import os
import sys
import threading
from typing import Callable, Iterator

import numpy as np
from absl import logging

from alexnet_jax import augment, store, streams
from alexnet_jax.dataset import Batch, Dataset

# All three wrap libjpeg-turbo and give the same pixels (its accurate integer
# IDCT and smooth chroma upsampling). simplejpeg, the fastest on the stored
# 256x256 images (docs/input.md), also decodes into a given buffer and
# releases the GIL throughout; Pillow, which needs no extra package, stands in
# where it is not installed.
DECODERS = ('simplejpeg', 'cv2', 'pil')
# Batches made or waiting, per process.
IN_FLIGHT_BYTES = 4 << 30


def default_decoder() -> str:
  try:
    import simplejpeg  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return 'pil'
  return 'simplejpeg'


class WrongShapeError(ValueError):
  """A JPEG that decodes to other dimensions than the store's images."""


def _check_shape(shape: tuple[int, ...], out: np.ndarray) -> None:
  if tuple(shape) != out.shape:
    raise WrongShapeError(f'{tuple(shape)}, not {out.shape}')


def decode_jpeg_simplejpeg(jpeg: bytes, out: np.ndarray) -> None:
  import simplejpeg
  try:
    pixels = simplejpeg.decode_jpeg(jpeg, colorspace='RGB', buffer=out)
  except ValueError:
    # Too large for `out`, or not a JPEG: the header tells which.
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    _check_shape((height, width, 3), out)
    raise
  _check_shape(pixels.shape, out)


def decode_jpeg_pil(jpeg: bytes, out: np.ndarray) -> None:
  from PIL import Image
  with Image.open(io.BytesIO(jpeg)) as image:
    if image.mode != 'RGB':
      image = image.convert('RGB')
    pixels = np.asarray(image)
  _check_shape(pixels.shape, out)
  out[...] = pixels


def decode_jpeg_cv2(jpeg: bytes, out: np.ndarray) -> None:
  import cv2
  bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
  if bgr is None:
    raise ValueError('not a decodable image')
  _check_shape(bgr.shape, out)
  out[...] = bgr[..., ::-1]


# Each decodes a JPEG into `out`, uint8 [H, W, 3], or raises ValueError.
DECODE: dict[str, Callable[[bytes, np.ndarray], None]] = {
    'simplejpeg': decode_jpeg_simplejpeg, 'pil': decode_jpeg_pil,
    'cv2': decode_jpeg_cv2}


class PreparedDataset(Dataset):
  """A prepared store's 'train' and 'validation' splits as batches.

  Training batches: a random image_size patch, uint8, with its offset, its
  reflection bit and its PCA lighting colour (section 4.1; the mean image is
  subtracted at that offset on the accelerator). Evaluation batches: the
  stored images, uint8; `preprocessing` says to cut the centre patch or,
  with `ten_crop`, the ten patches of section 4.1 (see
  `train.make_eval_step`).

  Args:
    store_dir: a directory written by `python -m alexnet_jax.prepare`.
    image_size: the network's input (227 for the 2012 network, 224 for the
      2014 one).
    lighting_sigma: standard deviation of the lighting coefficients; 0.1 in
      the paper, 0 switches the noise off (the draws still happen, so the
      crops and reflections stay the same).
    workers: decoding threads in all, each making whole batches (JPEG
      decoding and NumPy release the GIL); -1: one per CPU core this process
      may use.
    processes: grain worker processes that share the `workers` threads
      evenly; 0: all threads in this process.
    prefetch: batches buffered per process beyond those being made.
    ten_crop: evaluation batches carry the ten test patches.
    decoder: one of DECODERS; None: simplejpeg where it is installed, else
      Pillow.
    normalization: 'mean_image' (the paper's) or 'imagenet_mean_std'
      (torchvision's, which converted weights expect); see
      `augment.normalization`.
  """

  def __init__(self, store_dir: str, image_size: int, *,
               lighting_sigma: float = 0.1, workers: int = -1,
               processes: int = 0, prefetch: int = 2, ten_crop: bool = False,
               decoder: str | None = None,
               normalization: str = 'mean_image'):
    info = store.check_store(store_dir)
    stats = store.Statistics.load(store_dir)
    stored = info.image_size
    if stats.mean_image.shape != (stored, stored, 3):
      raise ValueError(f'{store_dir}: the mean image is '
                       f'{stats.mean_image.shape}, the images {stored}x'
                       f'{stored}x3')
    if not 0 < image_size <= stored:
      raise ValueError(f'image_size={image_size} does not fit in the stored '
                       f'{stored}x{stored} images')
    decoder = decoder or default_decoder()
    if decoder not in DECODERS:
      raise ValueError(f'decoder={decoder!r} is not one of {DECODERS}')
    if workers == -1:
      workers = len(os.sched_getaffinity(0))
    if workers < 1 or processes < 0 or prefetch < 0:
      raise ValueError(f'workers={workers}, processes={processes}, '
                       f'prefetch={prefetch}: need workers >= 1 (or -1), '
                       'processes >= 0 and prefetch >= 0')
    self.store_dir = store_dir
    self.name = info.name
    self.class_names = list(info.class_names)
    self.num_classes = info.num_classes
    self.num_train = info.sizes['train']
    self.num_eval = info.sizes['validation']
    self.image_size = image_size
    self.lighting_sigma = float(lighting_sigma)
    self.workers = workers
    self.processes = processes
    # Whole threads per process: a process never has none.
    self.threads = max(-(-workers // max(processes, 1)), 1)
    self.prefetch = prefetch
    self.ten_crop = ten_crop
    self.decoder = decoder
    self._decode_into = DECODE[decoder]
    self.stored_shape = (stored, stored, 3)
    self.preprocessing = augment.Preprocessing.create(
        normalization, stats.mean_image, image_size, ten=ten_crop)
    self.eigval = stats.eigval.astype(np.float64)
    self.eigvec = stats.eigvec.astype(np.float64)
    self._train = store.SplitSource(store_dir, 'train')
    self._eval = store.SplitSource(store_dir, 'validation')
    # As many as may be in flight, and the device prefetch's.
    self._buffers = BufferPool(IN_FLIGHT_BYTES)

  @classmethod
  def from_config(cls, config, image_size: int, *,
                  ten_crop: bool | None = None) -> 'PreparedDataset':
    """The dataset a config names: `store_dir`, `input.lighting_sigma`,
    `input.workers`, `input.processes`, `input.normalization`,
    `input.decoder` and `ten_crop_eval` (defaults for the fields it
    lacks)."""
    given = config.get('input') or {}
    if ten_crop is None:
      ten_crop = config.get('ten_crop_eval', False)
    return cls(config.get('store_dir'), image_size,
               lighting_sigma=given.get('lighting_sigma', 0.1),
               workers=given.get('workers', -1),
               processes=given.get('processes', 0), ten_crop=ten_crop,
               normalization=given.get('normalization', 'mean_image'),
               decoder=given.get('decoder'))

  def _decode(self, source: store.SplitSource, index: int,
              out: np.ndarray) -> int:
    """Decodes record `index` into `out`; returns its label."""
    try:
      label, jpeg = source[index]
      self._decode_into(jpeg, out)
    except store.StoreError:
      raise  # the store, not this record: nothing to skip to
    except WrongShapeError as e:
      raise ValueError(f'{self.store_dir}: record {index} is {e}') from e
    except Exception as e:
      raise ValueError(f'{self.store_dir}: record {index} does not decode: '
                       f'{e}') from e
    if not 0 <= label < self.num_classes:
      raise ValueError(f'{self.store_dir}: record {index} has label {label} '
                       f'of {self.num_classes} classes')
    return label

  # The synchronous path: one batch in the calling thread. The grain
  # pipelines below call it once per batch.

  def _train_examples(self, indices: np.ndarray, *, seed: int = 0,
                      epoch: int = 0, shared: bool = False) -> Batch:
    size, count = self.image_size, len(indices)
    images, decoded_at = self._train_arrays(count, shared)
    labels = np.empty(count, np.int32)
    skipped = np.zeros(count, np.int32)
    # Every example's values first, from its own stream, drawn for the whole
    # batch at once (streams.Batch: the Python-level work holds the
    # interpreter lock that another decoding thread needs); an example whose
    # record is replaced by the next usable one draws again below, from that
    # one's stream.
    stored = self.stored_shape[:2]
    sigma = self.lighting_sigma
    top, left, reflected, alphas = augment.draw_train_batch(
        stored, size, streams.Batch(seed, epoch, indices), sigma)
    corners = list(zip(top.tolist(), left.tolist()))
    for n, index in enumerate(int(i) for i in indices):
      decoded = decoded_at(n)
      used, skipped[n], labels[n] = self._usable_train(index, decoded)
      if used != index:
        top[n], left[n], reflected[n], alphas[n] = augment.draw_train(
            stored, size, next(streams.generators(seed, epoch, [used])),
            sigma)
        corners[n] = int(top[n]), int(left[n])
      y, x = corners[n]
      images[n] = decoded[y:y + size, x:x + size]
    return {'image': images, 'label': labels,
            'offset': np.stack([top, left], axis=1).astype(np.int32),
            'flip': reflected.astype(np.uint8),
            'lighting': augment.lighting_colours(alphas, self.eigval,
                                                 self.eigvec),
            'skipped': skipped}

  def _train_arrays(self, count: int, shared: bool
                    ) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
    """(patches, decoded_at): a training batch's patch array, and the
    array that example n's image is decoded into whole before its patch is
    copied into patches[n].

    Each image is decoded into the batch's own memory, just past the place
    of its patch, where the patches still to come have not reached: the
    patch copy then reads and writes memory that the decoder has just
    written and the cache still holds. Copied out of a buffer of the
    thread's own, each patch went into memory last touched a batch earlier,
    and the copy cost two to three times as much (docs/input.md). A
    shared-memory batch keeps the thread's buffer: grain hands on the array
    it made, not a view of a larger one.
    """
    size = self.image_size
    if shared:
      decoded = _scratch(self.stored_shape)
      return (self._empty((count, size, size, 3), True),
              lambda n: decoded)
    patch, whole = size * size * 3, int(np.prod(self.stored_shape))
    memory = self._buffers.empty((count * patch + whole,))

    def decoded_at(n: int) -> np.ndarray:
      # Past patch n's place: the copy never reads where it writes.
      start = (n + 1) * patch
      return memory[start:start + whole].reshape(self.stored_shape)
    return memory[:count * patch].reshape(count, size, size, 3), decoded_at

  def _usable_train(self, index: int, out: np.ndarray
                    ) -> tuple[int, int, int]:
    """Decodes into `out` the training example at `index` or, when its
    record cannot be used, the one at the next index whose record can: the
    same one on every pass, so the batch keeps its size and a resumed run
    reads the same. Returns (index used, records passed over, label)."""
    for passed in range(self.num_train):
      candidate = (index + passed) % self.num_train
      try:
        label = self._decode(self._train, candidate, out)
      except ValueError as e:
        logging.warning('Skipping a training example: %s', e)
        continue
      return candidate, passed, label
    raise ValueError(f'{self.store_dir}: no training record decodes')

  def _eval_examples(self, indices: np.ndarray, *,
                     shared: bool = False) -> Batch:
    images = self._empty((len(indices), *self.stored_shape), shared)
    labels = np.empty(len(indices), np.int32)
    for n, index in enumerate(indices):
      labels[n] = self._decode(self._eval, int(index), images[n])
    return {'image': images, 'label': labels}

  # The grain pipelines.

  def _iterate(self, batches, make_batch, batch_bytes: int
               ) -> Iterator[Batch]:
    import grain
    make_batch.shared = self.processes > 0
    # Every thread holds a batch and `prefetch` more wait; memory, not the
    # thread count, bounds how many are in flight.
    in_flight = max(IN_FLIGHT_BYTES // batch_bytes, 1)
    threads = min(self.threads, in_flight)
    prefetch = min(self.prefetch, in_flight - threads)
    ds = batches.map(make_batch).to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=threads + prefetch))
    if self.processes:
      _let_grain_read_its_flags()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.processes, per_worker_buffer_size=1))
    iterator = iter(ds)
    try:
      yield from iterator
    finally:
      # Stops the worker processes as soon as the caller drops the batches.
      close = getattr(iterator, 'close', None)
      if close is not None:
        close()

  def train_batches(self, *, batch_size: int, seed: int, start_step: int = 0,
                    rows: tuple[int, int] | None = None
                    ) -> Iterator[Batch]:
    import grain
    make_batch = _TrainBatch(self, batch_size, seed, rows)
    rows = make_batch.rows[1] - make_batch.rows[0]
    return self._iterate(grain.MapDataset.range(start_step, sys.maxsize),
                         make_batch, rows * self.image_size ** 2 * 3)

  def eval_batches(self, *, batch_size: int,
                   rows: tuple[int, int] | None = None
                   ) -> Iterator[Batch]:
    import grain
    count = -(-self.num_eval // batch_size)
    make_batch = _EvalBatch(self, batch_size, rows)
    rows = make_batch.rows[1] - make_batch.rows[0]
    return self._iterate(grain.MapDataset.range(count), make_batch,
                         rows * int(np.prod(self.stored_shape)))


  def _empty(self, shape: tuple[int, ...], shared: bool) -> np.ndarray:
    if shared:
      # A worker process builds its batch in shared memory, which grain
      # hands to the main process as it is; a private array would be copied
      # there.
      from grain import multiprocessing as grain_mp
      return grain_mp.SharedMemoryArray(shape, np.uint8)
    return self._buffers.empty(shape)


class BufferPool:
  """Batch arrays handed out again once nothing refers to them.

  The kernel faults in and zeroes the pages of a fresh array as it is first
  written, which here cost half as much as decoding the image that fills
  them; an array used again has its pages already. An array is free when
  only the pool holds it: every view of it, a device transfer's included,
  holds a reference to it. The pool keeps at most `limit_bytes` of arrays;
  past that it allocates without keeping.
  """

  def __init__(self, limit_bytes: int):
    self.limit_bytes = limit_bytes
    self._arrays: list[np.ndarray] = []
    self._lock = threading.Lock()
    # The count of an array that only the pool holds, measured rather than
    # assumed: interpreters differ in the references a call borrows.
    self._arrays.append(np.empty(0, np.uint8))
    self._alone = self._references(0)
    self._arrays.clear()

  def _references(self, position: int) -> int:
    return sys.getrefcount(self._arrays[position])

  def empty(self, shape: tuple[int, ...]) -> np.ndarray:
    with self._lock:
      # By position: a name bound to an array (a loop variable, enumerate's
      # tuple) would be one more reference to it.
      for position in range(len(self._arrays)):
        if (self._arrays[position].shape == shape
            and self._references(position) == self._alone):
          return self._arrays[position]
      array = np.empty(shape, np.uint8)
      kept = sum(a.nbytes for a in self._arrays)
      if kept + array.nbytes <= self.limit_bytes:
        self._arrays.append(array)
      return array

  def __getstate__(self):  # a worker process starts with none
    return {'limit_bytes': self.limit_bytes}

  def __setstate__(self, state):
    self.__init__(state['limit_bytes'])


_THREAD = threading.local()


def _scratch(shape: tuple[int, ...]) -> np.ndarray:
  """This thread's buffer for one decoded image."""
  buffer = getattr(_THREAD, 'decoded', None)
  if buffer is None or buffer.shape != shape:
    buffer = _THREAD.decoded = np.empty(shape, np.uint8)
  return buffer


def _let_grain_read_its_flags():
  # Starting workers, grain reads an absl flag of its own, which raises while
  # absl has not parsed the command line (a notebook, a test, a library
  # caller). Marking that flag as given keeps its default, as grain itself
  # does for its flags in the worker processes.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS['grain_enable_multiprocess_worker_profiling'].present = True


class _TrainBatch:
  """Step -> this process's rows of that step's global training batch."""

  def __init__(self, dataset: PreparedDataset, batch_size: int, seed: int,
               rows: tuple[int, int] | None):
    self.dataset = dataset
    self.batch_size = batch_size
    self.seed = seed
    self.rows = rows or (0, batch_size)
    self.shared = False
    self.steps_per_epoch = dataset.steps_per_epoch(batch_size)
    if self.steps_per_epoch < 1:
      raise ValueError(f'batch_size={batch_size} is larger than the '
                       f'{dataset.num_train} training examples')
    self._orders = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_orders'], state['_lock'] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _order(self, epoch: int) -> np.ndarray:
    # Threads of one process share the current epoch's permutation instead of
    # recomputing it (1.28M elements) for every batch.
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        order = self.dataset.epoch_order(self.seed, epoch)
        self._orders = {e: o for e, o in self._orders.items()
                        if e == epoch - 1}
        self._orders[epoch] = order
      return order

  def __call__(self, step: int) -> Batch:
    epoch, position = divmod(int(step), self.steps_per_epoch)
    start = position * self.batch_size
    first, last = self.rows
    indices = self._order(epoch)[start + first:start + last]
    return self.dataset._train_examples(  # pylint: disable=protected-access
        indices, seed=self.seed, epoch=epoch, shared=self.shared)


class _EvalBatch:
  """Batch number -> this process's rows, padded past the end and masked."""

  def __init__(self, dataset: PreparedDataset, batch_size: int,
               rows: tuple[int, int] | None):
    self.dataset = dataset
    self.batch_size = batch_size
    self.rows = rows or (0, batch_size)
    self.shared = False

  def __call__(self, number: int) -> Batch:
    first, last = self.rows
    start = int(number) * self.batch_size
    indices = np.arange(start + first, start + last)
    mask = indices < self.dataset.num_eval
    batch = self.dataset._eval_examples(  # pylint: disable=protected-access
        np.where(mask, indices, 0), shared=self.shared)
    batch['mask'] = mask.astype(np.float32)
    return batch
