"""The prepared store: the paper's 256x256 images in a random-access file format.

`python -m alexnet_jax.prepare` writes it once per dataset; the training input
pipeline reads it without TensorFlow. Layout of a store directory:

  info.json                  name, class names, split sizes, image size,
                             JPEG quality, shard files, and 'complete'
  <split>-NNNNN.array_record shards of records (ArrayRecord, random access)
  stats.json                 the training set's statistics: per-channel mean,
                             RGB covariance eigenvalues and eigenvectors
  mean_image.npy             the per-pixel mean image, float32, 0..255
  report.json                files skipped while preparing, and why

A record is a 4-byte little-endian label followed by a JPEG: shorter side
resized to 256 and the central 256x256 crop (paper, section 2), re-encoded.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import os
import resource
import struct

import numpy as np

INFO = 'info.json'
STATS = 'stats.json'
MEAN_IMAGE = 'mean_image.npy'
REPORT = 'report.json'
_LABEL = struct.Struct('<i')


def encode_record(label: int, jpeg: bytes) -> bytes:
  return _LABEL.pack(label) + jpeg


def decode_record(record: bytes) -> tuple[int, memoryview]:
  """(label, JPEG): the JPEG a view into the record, not a copy of it."""
  return _LABEL.unpack_from(record)[0], memoryview(record)[_LABEL.size:]


def shard_name(split: str, index: int) -> str:
  return f'{split}-{index:05d}.array_record'


@dataclasses.dataclass
class StoreInfo:
  name: str
  class_names: list[str]
  image_size: int = 256
  jpeg_quality: int = 90
  # split -> list of shard file names, in order; split sizes count records.
  shards: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  sizes: dict[str, int] = dataclasses.field(default_factory=dict)
  complete: bool = False

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def save(self, directory: str) -> None:
    tmp = os.path.join(directory, INFO + '.tmp')
    with open(tmp, 'w') as f:
      json.dump(dataclasses.asdict(self), f, indent=1)
    os.replace(tmp, os.path.join(directory, INFO))  # atomic: never half-written

  @classmethod
  def load(cls, directory: str) -> 'StoreInfo':
    with open(os.path.join(directory, INFO)) as f:
      return cls(**json.load(f))


class StoreError(FileNotFoundError):
  """A store that is missing or was not finished."""


def check_store(directory: str | None, *, splits=('train', 'validation')
                ) -> StoreInfo:
  """The store's info, or an error saying what to run to make it."""
  how = ('Prepare it with `python -m alexnet_jax.prepare --dataset=... '
         f'--out={directory}` (see README.md, "ImageNet").')
  if not directory or not os.path.exists(os.path.join(directory, INFO)):
    raise StoreError(f'No prepared dataset in {directory!r}. {how}')
  info = StoreInfo.load(directory)
  if not info.complete:
    raise StoreError(f'The dataset in {directory} is only partly prepared; '
                     f'run the same prepare command again to finish it. {how}')
  for split in splits:
    if not info.sizes.get(split):
      raise StoreError(f'The dataset in {directory} has no {split!r} split.')
  for split in splits:
    for shard in info.shards[split]:
      if not os.path.exists(os.path.join(directory, shard)):
        raise StoreError(f'{shard} is missing from {directory}. {how}')
  for name in (STATS, MEAN_IMAGE):
    if not os.path.exists(os.path.join(directory, name)):
      raise StoreError(
          f'{name} (the training set statistics) is missing from '
          f'{directory}. Prepare the dataset again into a new --out '
          f'directory: {how}')
  return info


def write_shard(path: str, records) -> int:
  """Writes records to an ArrayRecord file via a temporary name; returns the
  count. A shard either exists whole or not at all."""
  from array_record.python import array_record_module
  tmp = path + '.tmp'
  # One record per group: random access reads one record. Uncompressed:
  # JPEG bytes do not compress, and zstd (ArrayRecord's default) only costs
  # time, at writing and at every read (stores written with it stay
  # readable: the reader takes what the file's header says).
  writer = array_record_module.ArrayRecordWriter(
      tmp, 'group_size:1,uncompressed')
  count = 0
  for record in records:
    writer.write(record)
    count += 1
  writer.close()
  os.replace(tmp, path)
  return count


class SplitSource:
  """Random access to one split's records: `source[i] -> (label, jpeg)`,
  the JPEG a read-only view of the record.

  ArrayRecord's readers, one per shard, opened here (a worker process opens
  its own) and shared by the threads of the process. A record is read with the
  reader's range read, `read(i, i + 1)`: array_record's
  `ArrayRecordDataSource` reads one record through the reader's batched
  path, `read([i])`, which costs more per record (`python -m
  alexnet_jax.loader_benchmark --stages` times the read).
  """

  def __init__(self, directory: str, split: str):
    info = StoreInfo.load(directory)
    self._paths = [os.path.join(directory, s) for s in info.shards[split]]
    self._open()
    # The first index past each shard.
    self._ends = list(itertools.accumulate(
        reader.num_records() for reader in self._readers))
    if len(self) != info.sizes.get(split, len(self)):
      raise StoreError(
          f'The {split!r} shards in {directory} hold {len(self)} records, '
          f'and info.json says {info.sizes[split]}: the store was changed '
          'after it was prepared. Prepare it again into a new --out '
          'directory.')

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def _open(self):
    _make_room_for_files(len(self._paths))
    self._readers = [_open_reader(path) for path in self._paths]

  def __getitem__(self, index: int) -> tuple[int, memoryview]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} of {len(self)}')
    shard = bisect.bisect_right(self._ends, index)
    position = index - (self._ends[shard - 1] if shard else 0)
    return decode_record(self._readers[shard].read(position,
                                                  position + 1)[0])

  def __getstate__(self):  # worker processes reopen the files themselves
    return {'paths': self._paths, 'ends': self._ends}

  def __setstate__(self, state):
    self._paths, self._ends = state['paths'], state['ends']
    self._open()


def _open_reader(path: str):
  from array_record.python import array_record_module
  # No readahead: reads are random, one record each.
  reader = array_record_module.ArrayRecordReader(path,
                                                 'readahead_buffer_size:0')
  # The reader does not raise: a file it cannot open or parse gives a
  # reader that is not ok() and holds no records, whose every read would
  # look like an undecodable record.
  if not reader.ok():
    raise StoreError(
        f'Cannot read the shard {path}: it is missing or damaged, or this '
        'process may open no more files (each shard stays open while the '
        'store is read; the limit is '
        f'{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}: raise it with '
        '`ulimit -n`, or prepare the store again with a larger '
        '--shard_size).')
  return reader


def _make_room_for_files(count: int) -> None:
  """Raises this process's soft limit on open files, up to the hard limit,
  so that `count` more fit: an ImageNet store has about 1,300 shards and a
  reader holds its shard open, where many systems allow 1,024 files."""
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  try:
    in_use = len(os.listdir('/proc/self/fd'))
  except OSError:  # no /proc (macOS): assume a few hundred
    in_use = 256
  need = in_use + count + 64  # and room for the run's other files
  if soft == resource.RLIM_INFINITY or need <= soft:
    return
  if hard != resource.RLIM_INFINITY:
    need = min(need, hard)
  if need > soft:
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@dataclasses.dataclass
class Statistics:
  """What the paper's preprocessing needs from the training set."""

  mean_rgb: np.ndarray       # [3], 0..255
  eigval: np.ndarray         # [3], of the covariance of RGB in 0..1
  eigvec: np.ndarray         # [3, 3], columns are the eigenvectors
  mean_image: np.ndarray     # [256, 256, 3], 0..255

  def save(self, directory: str) -> None:
    np.save(os.path.join(directory, MEAN_IMAGE),
            self.mean_image.astype(np.float32))
    with open(os.path.join(directory, STATS), 'w') as f:
      json.dump({'mean_rgb': self.mean_rgb.tolist(),
                 'eigval': self.eigval.tolist(),
                 'eigvec': self.eigvec.tolist()}, f, indent=1)

  @classmethod
  def load(cls, directory: str) -> 'Statistics':
    with open(os.path.join(directory, STATS)) as f:
      s = json.load(f)
    return cls(np.asarray(s['mean_rgb'], np.float32),
               np.asarray(s['eigval'], np.float32),
               np.asarray(s['eigvec'], np.float32),
               np.load(os.path.join(directory, MEAN_IMAGE)))
