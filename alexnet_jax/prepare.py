"""Prepares a dataset once into the store that training reads (see store.py).

    python -m alexnet_jax.prepare --dataset=imagenet2012 --manual_dir=DIR \
        --out=STORE [--data_dir=TFDS_DIR] [--workers=N]
    python -m alexnet_jax.prepare --dataset=folder --source=ROOT --out=STORE
    python -m alexnet_jax.prepare --dataset=imagenette --out=STORE

Every image becomes what the paper feeds the network (section 2): the shorter
side rescaled to 256 and the central 256x256 patch, re-encoded as a JPEG
(`--quality`, 90 by default; `encode_jpeg`). Pillow decodes every file
itself, so CMYK and greyscale JPEGs and PNGs under a .JPEG name all come out
RGB; a file it cannot decode, or one that ends early, is left out and listed
in report.json, and the rest is prepared. The rescaling is Pillow's bicubic filter, antialiased
(its support widens with the reduction), applied to the central square of the
original in one step (`Image.resize(box=...)`), which is the rescale-then-crop
of the paper without rounding the intermediate size; `reducing_gap=3` first
shrinks an image six or more times too large by a whole factor (box
averaging), which Pillow documents as indistinguishable from the direct
filter, and is faster.

Sources:
  imagenet2012  TFDS builds it (offline) from ILSVRC2012_img_train.tar and
                ILSVRC2012_img_val.tar in --manual_dir, once, as ArrayRecord;
                TensorFlow is needed for that build only.
  folder        ROOT/<class>/<image> (classes sorted by name, sub-folders
                included), or ROOT/train/<class>/... with ROOT/val/<class>/...
                Without a val folder, round(--val_fraction x its size) files
                of each class go to validation: those whose relative paths
                have the lowest SHA-1, so the split is the same on every
                machine and in every run.
  other names   any TFDS dataset with (image, label) supervised keys, built
                with `download_and_prepare(file_format='array_record')`
                (downloads what it needs). Its 'validation' split, else its
                'test' split, becomes the store's validation split; with
                neither, the last --val_fraction of 'train'.

Output order is the source's order (TFDS's record order; the folder's sorted
order), whatever the number of workers. Shard k of a split holds the source's
records [k * shard_size, (k + 1) * shard_size) minus the skipped ones, so each
shard is a function of its index alone: a rerun of an interrupted command
keeps the shards already written (each is written under a temporary name and
renamed, then a small <shard>.partial.npz beside it marks it finished and
keeps its counts, skipped files and sums) and makes only the rest. info.json
says complete only once everything is written; the .partial.npz files are
removed after that.

Statistics of the training split (section 4.1's PCA lighting, section 2's mean
image) are computed from the images as written, decoded again, over every
pixel of every image: sums of pixel values and of their pairwise products are
integers, accumulated exactly in int64 per shard, so they do not depend on the
order of the work or on interruptions. The covariance is of RGB scaled to
[0, 1], normalised by the number of pixels; eigenvalues come largest first,
eigenvectors are the columns.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
from PIL import Image, ImageFile

from alexnet_jax import store

IMAGE_SIZE = 256
RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 3.0
TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
PARTIAL = '.partial.npz'
# Records a worker converts per task: large enough to amortise the round trip,
# small enough that progress and the work spread stay even.
CHUNK = 32


class PrepareError(RuntimeError):
  """A preparation that cannot start as asked; the message says why."""


# ----------------------------------------------------------------- images --


def decode_rgb(data: bytes) -> Image.Image:
  """Any image Pillow reads, as RGB (CMYK, greyscale, palette, PNG, ...).

  `load()` decodes the whole file now: with LOAD_TRUNCATED_IMAGES off (set in
  every worker), a file that ends early raises here instead of coming back
  with its missing rows grey.
  """
  with Image.open(io.BytesIO(data)) as image:
    image.load()
    return image.convert('RGB')


def central_crop(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
  """Shorter side to `size`, then the central size x size patch (section 2)."""
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  return image.resize((size, size), RESAMPLE,
                      box=(left, top, left + side, top + side),
                      reducing_gap=REDUCING_GAP)


# The stored form, beside the quality: 4:2:0 chroma, and Huffman tables made
# for each image (`optimize`), which code the same coefficients, so the same
# pixels, as the standard tables, in a smaller file that decodes faster. A
# stored JPEG is decoded in every epoch and encoded once.
# `benchmarks/input_peers.py --pipelines=decode,forms` times the other forms
# (docs/input.md).
JPEG_OPTIONS = {'subsampling': '4:2:0', 'optimize': True}


def encode_jpeg(image: Image.Image, quality: int, **changes) -> bytes:
  """The stored JPEG; `changes` to JPEG_OPTIONS (Pillow's options) give
  the other forms that benchmarks/input_peers.py times."""
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG', quality=quality, **{**JPEG_OPTIONS, **changes})
  return buffer.getvalue()


def jpeg_pixels(jpeg: bytes) -> np.ndarray:
  """A stored image as training will see it: uint8 [256, 256, 3]."""
  with Image.open(io.BytesIO(jpeg)) as image:
    return np.asarray(image.convert('RGB'))


@dataclasses.dataclass
class Sums:
  """Exact integer sums over the pixels of some images (see the module doc)."""

  images: int = 0
  # Per-pixel sums over the images; their total is each channel's sum.
  image: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.int64))
  # Sums of r*r, r*g, ... over every pixel.
  outer: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((3, 3), np.int64))

  def add_image(self, pixels: np.ndarray) -> None:
    flat = pixels.reshape(-1, 3).astype(np.int64)
    self.images += 1
    self.image += pixels
    self.outer += flat.T @ flat

  def add(self, other: 'Sums') -> None:
    self.images += other.images
    self.image += other.image
    self.outer += other.outer

  def statistics(self) -> store.Statistics:
    if not self.images:
      raise PrepareError('The training split has no decodable image.')
    pixels = self.images * IMAGE_SIZE * IMAGE_SIZE
    mean = self.image.sum(axis=(0, 1)) / pixels
    covariance = (self.outer / pixels - np.outer(mean, mean)) / 255.0**2
    eigval, eigvec = np.linalg.eigh(covariance)
    order = np.argsort(eigval)[::-1]
    return store.Statistics(
        mean_rgb=mean, eigval=eigval[order], eigvec=eigvec[:, order],
        mean_image=(self.image / self.images).astype(np.float32))


# ---------------------------------------------------------------- sources --


@dataclasses.dataclass(frozen=True)
class TfdsReader:
  """Reads raw records of one prepared TFDS split (in a worker: picklable).

  The images stay as the bytes TFDS stored (SkipDecoding): Pillow decodes
  them, because TFDS's TF-free decoder fails on the files it did not convert
  itself with an unhelpful error.
  """

  name: str
  split: str
  data_dir: str
  image_key: str
  label_key: str
  name_key: str | None

  def read(self, keys: Sequence[int]) -> list[tuple[bytes, int, str]]:
    source = _OPEN_SOURCES.get(self)
    if source is None:
      import tensorflow_datasets as tfds  # reading needs no TensorFlow
      source = tfds.data_source(
          self.name, split=self.split, data_dir=self.data_dir,
          download=False,
          decoders={self.image_key: tfds.decode.SkipDecoding()})
      _OPEN_SOURCES[self] = source
    examples = source.__getitems__([int(k) for k in keys])
    return [(example[self.image_key], int(example[self.label_key]),
             self._name(example, key)) for key, example in zip(keys, examples)]

  def _name(self, example: dict[str, Any], key: int) -> str:
    if self.name_key:
      name = example[self.name_key]
      return name.decode() if isinstance(name, bytes) else str(name)
    return f'{self.split}[{key}]'


_OPEN_SOURCES: dict[TfdsReader, Any] = {}


@dataclasses.dataclass(frozen=True)
class FolderReader:
  """Reads files under a root; keys are (relative path, label)."""

  root: str

  def read(self, keys: Sequence[tuple[str, int]]
           ) -> list[tuple[bytes, int, str]]:
    out = []
    for path, label in keys:
      with open(os.path.join(self.root, path), 'rb') as f:
        out.append((f.read(), label, path))
    return out


@dataclasses.dataclass
class Split:
  name: str                 # the store's: 'train' or 'validation'
  origin: str               # where its records come from, for the report
  keys: Sequence[Any]       # one per record, in output order, for `reader`
  reader: Any               # .read(keys) -> [(bytes, label, name)]


@dataclasses.dataclass
class Source:
  name: str
  class_names: list[str]
  splits: list[Split]
  description: dict[str, Any]


def _tfds_data_dir(data_dir: str | None) -> str:
  return os.path.expanduser(data_dir or os.environ.get(
      'TFDS_DATA_DIR', os.path.join('~', 'tensorflow_datasets')))


def check_manual_dir(manual_dir: str) -> None:
  """Fails before TFDS starts, naming the directory and what it lacks.

  TFDS itself only warns when an archive is missing and builds a dataset
  without that split.
  """
  missing = [name for name in (TRAIN_TAR, VAL_TAR)
             if not os.path.isfile(os.path.join(manual_dir, name))]
  if missing:
    raise FileNotFoundError(
        f'ImageNet archives missing from the manual directory {manual_dir}: '
        f'{", ".join(missing)}.\nTFDS builds imagenet2012 from two files you '
        'download yourself from https://image-net.org (after registering):\n'
        f'  {TRAIN_TAR}  (138 GB)\n  {VAL_TAR}    (6.3 GB)\n'
        f'Put both in {manual_dir}, or pass --manual_dir=DIR where they are.')


def _check_imagenet_dependencies() -> None:
  # TFDS's imagenet2012 builder imports both lazily, deep inside the build,
  # with errors that do not say what to install.
  for module, package in (('tensorflow', 'tensorflow-cpu'),
                          ('importlib_resources', 'importlib_resources')):
    if importlib.util.find_spec(module) is None:
      raise PrepareError(f'Building imagenet2012 with TFDS needs {module}: '
                         f'pip install {package}')


def tfds_source(name: str, *, data_dir: str | None = None,
                manual_dir: str | None = None,
                val_fraction: float = 0.1) -> Source:
  """A TFDS dataset, built as ArrayRecord first if it is not yet."""
  # TFDS imports TensorFlow only to build (imagenet2012 needs it), not to read.
  import tensorflow_datasets as tfds
  data_dir = _tfds_data_dir(data_dir)
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    download = {}
    if name.split(':')[0].split('/')[0] == 'imagenet2012':
      manual_dir = os.path.expanduser(
          manual_dir or os.path.join(data_dir, 'downloads', 'manual'))
      check_manual_dir(manual_dir)
      _check_imagenet_dependencies()
      download['try_download_gcs'] = False  # nothing to fetch: all manual
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                     **download),
        file_format='array_record')
  file_format = str(getattr(builder.info.file_format, 'value',
                            builder.info.file_format))
  if file_format != 'array_record':
    raise PrepareError(
        f'{name} in {builder.data_dir} was prepared as {file_format}; random '
        'access needs ArrayRecord. Convert it with `tfds convert_format '
        f'--dataset_version_dir={builder.data_dir} '
        '--out_file_format=array_record`, or prepare it again in another '
        '--data_dir.')

  features = builder.info.features
  if not builder.info.supervised_keys:
    raise PrepareError(f'{name} has no (image, label) supervised keys.')
  image_key, label_key = builder.info.supervised_keys[:2]
  if not (isinstance(image_key, str) and isinstance(label_key, str)
          and isinstance(features[image_key], tfds.features.Image)
          and isinstance(features[label_key], tfds.features.ClassLabel)):
    raise PrepareError(f'{name} is not an image classification dataset: its '
                       f'supervised keys are {builder.info.supervised_keys}.')
  name_key = 'file_name' if 'file_name' in features else None

  splits = builder.info.splits
  if 'train' not in splits:
    raise PrepareError(f'{name} has no train split (it has {list(splits)}).')
  if 'validation' in splits or 'test' in splits:
    origins = {'train': 'train',
               'validation': 'validation' if 'validation' in splits else 'test'}
  else:
    percent = round(100 * (1 - val_fraction))
    origins = {'train': f'train[:{percent}%]',
               'validation': f'train[{percent}%:]'}
  source_splits = []
  for split, origin in origins.items():
    reader = TfdsReader(name, origin, data_dir, image_key, label_key, name_key)
    size = len(tfds.data_source(name, split=origin, data_dir=data_dir,
                                download=False))
    source_splits.append(Split(split, origin, range(size), reader))
  return Source(name, list(features[label_key].names), source_splits,
                {'tfds': name, 'version': str(builder.info.version),
                 'data_dir': data_dir, 'splits': origins})


def _hash(path: str) -> str:
  return hashlib.sha1(path.encode()).hexdigest()


def _files(root: str, directory: str) -> list[str]:
  """Every non-hidden file under root/directory, relative to root, sorted."""
  found = []
  for parent, dirs, files in os.walk(os.path.join(root, directory)):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found += [os.path.relpath(os.path.join(parent, f), root)
              for f in files if not f.startswith('.')]
  return sorted(found)


def _classes(directory: str) -> list[str]:
  return sorted(d for d in os.listdir(directory)
                if not d.startswith('.')
                and os.path.isdir(os.path.join(directory, d)))


def folder_source(root: str, val_fraction: float = 0.1) -> Source:
  """Images laid out as root/<class>/..., or root/train/<class>/... with
  root/val/<class>/... (or without it: then split as the flat layout is)."""
  root = os.path.expanduser(root or '')
  if not os.path.isdir(root):
    raise FileNotFoundError(f'--source={root!r} is not a directory.')
  prefix, val_dir = '', None
  if os.path.isdir(os.path.join(root, 'train')):
    prefix = 'train/'
    val_dir = next((d for d in ('val', 'validation')
                    if os.path.isdir(os.path.join(root, d))), None)
  classes = _classes(os.path.join(root, prefix))
  if not classes:
    raise PrepareError(f'No class folders in {root}: expected '
                       f'{root}/<class>/<image> or {root}/train/<class>/...')
  label = {c: i for i, c in enumerate(classes)}
  train, validation = [], []
  for c in classes:
    files = _files(root, prefix + c)
    if val_dir:
      train += [(f, label[c]) for f in files]
      continue
    # The files whose names hash lowest: deterministic, stratified by class.
    held_out = set(sorted(files, key=_hash)[:round(val_fraction * len(files))])
    train += [(f, label[c]) for f in files if f not in held_out]
    validation += [(f, label[c]) for f in files if f in held_out]
  if val_dir:
    for c in _classes(os.path.join(root, val_dir)):
      if c not in label:
        raise PrepareError(f'{os.path.join(root, val_dir, c)} is not a class '
                           f'of {os.path.join(root, "train")}.')
      validation += [(f, label[c]) for f in _files(root, f'{val_dir}/{c}')]
  if not train or not validation:
    raise PrepareError(
        f'{root} gives {len(train)} training and {len(validation)} validation '
        'files; both splits need some (raise --val_fraction, or add images).')
  reader = FolderReader(root)
  held_out = (f'{val_dir}/' if val_dir
              else f'{val_fraction:g} of each class of {prefix}<class>/')
  return Source(os.path.basename(os.path.normpath(root)), classes,
                [Split('train', f'{prefix}<class>/', train, reader),
                 Split('validation', held_out, validation, reader)],
                {'folder': root, 'train': f'{prefix}<class>/',
                 'validation': held_out})


# ---------------------------------------------------------------- workers --


def _init_worker() -> None:
  import signal
  # Ctrl-C reaches the whole process group: the parent stops the pool.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  ImageFile.LOAD_TRUNCATED_IMAGES = False  # see decode_rgb


def convert_chunk(reader, keys, quality: int, with_sums: bool):
  """Reads and converts some records; per record (label, jpeg, name, reason),
  with jpeg None and the reason set when the file is skipped."""
  out, sums = [], Sums() if with_sums else None
  for data, label, name in reader.read(keys):
    try:
      image = decode_rgb(data)
    except Exception as e:  # pylint: disable=broad-except
      # Whatever a broken file makes Pillow raise (OSError, SyntaxError,
      # DecompressionBombError, ...) is a fact about that file.
      out.append((label, None, name, f'{type(e).__name__}: {e}'))
      continue
    jpeg = encode_jpeg(central_crop(image), quality)
    if sums is not None:
      sums.add_image(jpeg_pixels(jpeg))
    out.append((label, jpeg, name, None))
  return out, sums


# ------------------------------------------------------------------ store --


def _partial_path(out: str, shard: str) -> str:
  return os.path.join(out, shard + PARTIAL)


def _load_partial(out: str, shard: str) -> dict[str, Any] | None:
  """A finished shard's bookkeeping, or None when it has to be (re)made."""
  path = _partial_path(out, shard)
  if not (os.path.exists(path) and os.path.exists(os.path.join(out, shard))):
    return None
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _fingerprint(split: Split) -> str:
  """What a split's records are, so that a rerun on changed files (a folder
  with images added) does not mix old shards with new ones."""
  digest = hashlib.sha1(f'{split.origin}\n{len(split.keys)}\n'.encode())
  if not isinstance(split.keys, range):
    for key in split.keys:
      digest.update(f'{key}\n'.encode())
  return digest.hexdigest()


def _save_partial(out: str, shard: str, fingerprint: str, start: int,
                  stop: int, written: int, skipped: list[dict[str, str]],
                  sums: Sums | None) -> None:
  arrays = dict(fingerprint=np.array(fingerprint), start=start, stop=stop,
                written=written, skipped=np.array(json.dumps(skipped)))
  if sums is not None:
    arrays.update(images=sums.images, image=sums.image, outer=sums.outer)
  path = _partial_path(out, shard)
  with open(path + '.tmp', 'wb') as f:
    np.savez_compressed(f, **arrays)
  os.replace(path + '.tmp', path)  # written last: it marks the shard done


def _start_info(out: str, source: Source, quality: int) -> store.StoreInfo:
  """The store's info, new or (on a rerun) checked against this command."""
  info = store.StoreInfo(name=source.name, class_names=source.class_names,
                         image_size=IMAGE_SIZE, jpeg_quality=quality)
  if os.path.exists(os.path.join(out, store.INFO)):
    old = store.StoreInfo.load(out)
    for field in ('name', 'class_names', 'image_size', 'jpeg_quality'):
      if getattr(old, field) != getattr(info, field):
        raise PrepareError(
            f'{out} holds another preparation ({field} differs: '
            f'{str(getattr(old, field))[:80]} there, '
            f'{str(getattr(info, field))[:80]} now). Use another --out, or '
            'delete it to start over.')
    if old.complete:
      return old
  info.save(out)
  return info


class _Progress:
  """A log line every `every` seconds: records/s and time left."""

  def __init__(self, total: int, every: float):
    self.total, self.every, self.done = total, every, 0
    self.start = self.last = time.monotonic()

  def update(self, count: int, split: str) -> None:
    self.done += count
    now = time.monotonic()
    if now - self.last < self.every and self.done < self.total:
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    left = (self.total - self.done) / rate if rate else float('inf')
    logging.info('%s: %d/%d records (%.1f%%), %.1f records/s, %s left',
                 split, self.done, self.total,
                 100 * self.done / max(self.total, 1), rate, _duration(left))


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else (
      f'{minutes}m{seconds:02d}s')


def convert(source: Source, out: str, *, workers: int | None = None,
            quality: int = 90, shard_size: int = 1024,
            progress_seconds: float = 5.0,
            on_shard: Callable[[str, int], None] | None = None
            ) -> store.StoreInfo:
  """Writes `source` as a store in `out`, continuing an interrupted run.

  Args:
    source: from `tfds_source` or `folder_source`.
    out: the store directory.
    workers: processes that decode, rescale and encode (os.cpu_count()).
    quality: JPEG quality of the stored images.
    shard_size: source records per shard; a rerun must use the same.
    progress_seconds: how often to log progress.
    on_shard: called with (split, shard index) after each shard is finished.

  Returns:
    The store's info, complete.
  """
  if shard_size < 1 or not 1 <= quality <= 100:
    raise PrepareError(f'Need shard_size >= 1 and quality in 1..100, got '
                       f'{shard_size} and {quality}.')
  os.makedirs(out, exist_ok=True)
  info = _start_info(out, source, quality)
  if info.complete:
    logging.info('%s is already prepared in %s.', info.name, out)
    return info

  # (split, shard index, start, stop) of every shard, and those still to do.
  plan = [(split, k, start, min(start + shard_size, len(split.keys)))
          for split in source.splits
          for k, start in enumerate(range(0, len(split.keys), shard_size))]
  fingerprints = {split.name: _fingerprint(split) for split in source.splits}
  todo = []
  for split, k, start, stop in plan:
    shard = store.shard_name(split.name, k)
    partial = _load_partial(out, shard)
    if partial is None:
      todo.append((split, k, start, stop))
    elif str(partial['fingerprint']) != fingerprints[split.name]:
      raise PrepareError(
          f'{out} was started from other {split.name} files than there are '
          f'now ({split.origin}); use another --out, or delete it to start '
          'over.')
    elif (int(partial['start']), int(partial['stop'])) != (start, stop):
      raise PrepareError(
          f'{out} was started with another --shard_size (its {shard} holds '
          f'records {int(partial["start"])}..{int(partial["stop"])}); rerun '
          'with that size, or delete the directory to start over.')
  if todo:
    logging.info('%d of %d shards to write in %s, %s workers.', len(todo),
                 len(plan), out, workers or os.cpu_count())
    _write_shards(out, todo, fingerprints, len(info.class_names),
                  workers or os.cpu_count() or 1, quality,
                  _Progress(sum(stop - start for *_, start, stop in todo),
                            progress_seconds), on_shard)
  return _finish(out, info, source, plan)


def _converted(pool, todo, quality, window_size):
  """Chunks of the shards to do, converted by the pool, in source order.

  Chunks go out at most `window_size` ahead of the one awaited, so memory
  stays bounded (Pool.imap would read the whole dataset ahead).
  """
  window = collections.deque()
  for split, k, start, stop in todo:
    for first in range(start, stop, CHUNK):
      last = min(first + CHUNK, stop)
      window.append(((split, k, start, stop, first, last), pool.apply_async(
          convert_chunk, (split.reader, split.keys[first:last], quality,
                          split.name == 'train'))))
      if len(window) > window_size:
        task, result = window.popleft()
        yield task, result.get()
  while window:
    task, result = window.popleft()
    yield task, result.get()


def _write_shards(out, todo, fingerprints, num_classes, workers, quality,
                  progress, on_shard) -> None:
  # spawn: the parent may hold TensorFlow's threads, which fork would copy.
  context = multiprocessing.get_context('spawn')
  with context.Pool(workers, initializer=_init_worker) as pool:
    for (split, k, start, stop, first, last), (converted, chunk_sums) in (
        _converted(pool, todo, quality, 4 * workers)):
      if first == start:
        records, skipped = [], []
        sums = Sums() if split.name == 'train' else None
      for label, jpeg, name, reason in converted:
        if not 0 <= label < num_classes:
          raise PrepareError(f'{name} in {split.origin} has label {label}, '
                             f'outside the {num_classes} classes.')
        if jpeg is None:
          skipped.append({'split': split.name, 'file': name, 'reason': reason})
        else:
          records.append(store.encode_record(label, jpeg))
      if chunk_sums is not None:
        sums.add(chunk_sums)
      progress.update(last - first, split.name)
      if last == stop:
        shard = store.shard_name(split.name, k)
        store.write_shard(os.path.join(out, shard), records)
        _save_partial(out, shard, fingerprints[split.name], start, stop,
                      len(records), skipped, sums)
        if on_shard:
          on_shard(split.name, k)


def _finish(out, info, source, plan) -> store.StoreInfo:
  """Statistics, report and the complete info, from the shards' partials."""
  sums = Sums()
  skipped = []
  counts = {split.name: {'source': len(split.keys), 'written': 0,
                         'skipped': 0} for split in source.splits}
  shards = {split.name: [] for split in source.splits}
  for split, k, _, _ in plan:
    shard = store.shard_name(split.name, k)
    partial = _load_partial(out, shard)
    shards[split.name].append(shard)
    shard_skipped = json.loads(str(partial['skipped']))
    skipped += shard_skipped
    counts[split.name]['written'] += int(partial['written'])
    counts[split.name]['skipped'] += len(shard_skipped)
    if split.name == 'train':
      sums.add(Sums(int(partial['images']), partial['image'],
                    partial['outer']))
  for split, numbers in counts.items():
    if not numbers['written']:
      raise PrepareError(f'No image of the {split} split could be decoded; '
                         f'see {os.path.join(out, store.REPORT)}.')
  sums.statistics().save(out)
  report = {
      'dataset': source.name, 'source': source.description, 'counts': counts,
      'skipped': skipped,
      'conversion': {'size': IMAGE_SIZE, 'resample': 'bicubic',
                     'reducing_gap': REDUCING_GAP,
                     'jpeg_quality': info.jpeg_quality},
  }
  with open(os.path.join(out, store.REPORT + '.tmp'), 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(os.path.join(out, store.REPORT + '.tmp'),
             os.path.join(out, store.REPORT))
  info.shards = shards
  info.sizes = {split: numbers['written'] for split, numbers in counts.items()}
  info.complete = True
  info.save(out)  # last: the store is usable only from here on
  for names in shards.values():
    for shard in names:
      os.remove(_partial_path(out, shard))
  logging.info('%s prepared in %s: %s; %d files skipped (see %s).',
               source.name, out,
               ', '.join(f'{s} {n}' for s, n in info.sizes.items()),
               len(skipped), store.REPORT)
  return info


def prepare(dataset: str, out: str, *, manual_dir: str | None = None,
            data_dir: str | None = None, source: str | None = None,
            val_fraction: float = 0.1, **kwargs) -> store.StoreInfo:
  """The command's work: `dataset` is 'folder' or a TFDS name; `kwargs` go to
  `convert` (workers, quality, shard_size, progress_seconds, on_shard)."""
  if not 0 < val_fraction < 1:
    raise PrepareError(f'--val_fraction must be in (0, 1), got {val_fraction}')
  if dataset == 'folder':
    if not source:
      raise PrepareError('--dataset=folder needs --source=ROOT.')
    data = folder_source(source, val_fraction)
  else:
    data = tfds_source(dataset, data_dir=data_dir, manual_dir=manual_dir,
                       val_fraction=val_fraction)
  return convert(data, os.path.expanduser(out), **kwargs)


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from alexnet_jax import metrics_io
  metrics_io.quiet_library_logs()
  f = flags.FLAGS
  try:
    prepare(f.dataset, f.out, manual_dir=f.manual_dir, data_dir=f.data_dir,
            source=f.source, val_fraction=f.val_fraction, workers=f.workers,
            quality=f.quality, shard_size=f.shard_size)
  except (PrepareError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def _define_flags():
  from absl import flags
  flags.DEFINE_string('dataset', None, "'imagenet2012', 'folder' or another "
                      'TFDS image classification dataset.')
  flags.DEFINE_string('out', None, 'The store directory; rerun the same '
                      'command to continue an interrupted preparation.')
  flags.DEFINE_string('manual_dir', None, 'imagenet2012: where '
                      f'{TRAIN_TAR} and {VAL_TAR} are (default: '
                      '<data_dir>/downloads/manual).')
  flags.DEFINE_string('data_dir', None, 'TFDS data directory (default: '
                      '$TFDS_DATA_DIR or ~/tensorflow_datasets).')
  flags.DEFINE_string('source', None, 'folder: ROOT/<class>/<image>, or '
                      'ROOT/train/<class>/... and ROOT/val/<class>/...')
  flags.DEFINE_float('val_fraction', 0.1, 'Share of each class held out for '
                     'validation when the source has no validation split.')
  flags.DEFINE_integer('workers', None, 'Conversion processes '
                       '(default: os.cpu_count()).')
  flags.DEFINE_integer('quality', 90, 'JPEG quality of the stored images.')
  flags.DEFINE_integer('shard_size', 1024, 'Source records per shard.')
  flags.mark_flags_as_required(['dataset', 'out'])


if __name__ == '__main__':
  from absl import app
  # Run the importable module's copy, so that what the workers are sent
  # pickles as alexnet_jax.prepare.*, not __main__.*.
  from alexnet_jax import prepare as _prepare
  _prepare._define_flags()  # pylint: disable=protected-access
  app.run(_prepare.main)
