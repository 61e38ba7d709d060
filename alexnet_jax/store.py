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
import struct
import threading

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

  ArrayRecord's readers, one per shard, shared by the threads of a process
  (a worker process opens its own on first use). A record is read with the
  reader's range read, `read(i, i + 1)`: array_record's
  `ArrayRecordDataSource` reads one record through the reader's batched
  path, `read([i])`, which costs more per record (`python -m
  alexnet_jax.loader_benchmark --stages` times the read).
  """

  def __init__(self, directory: str, split: str):
    info = StoreInfo.load(directory)
    self._paths = [os.path.join(directory, s) for s in info.shards[split]]
    self._lock = threading.Lock()
    self._readers = [_open_reader(path) for path in self._paths]
    # The first index past each shard.
    self._ends = list(itertools.accumulate(
        reader.num_records() for reader in self._readers))

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def _reader(self, shard: int):
    reader = self._readers[shard]
    if reader is None:
      with self._lock:
        reader = self._readers[shard]
        if reader is None:
          reader = self._readers[shard] = _open_reader(self._paths[shard])
    return reader

  def __getitem__(self, index: int) -> tuple[int, memoryview]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} of {len(self)}')
    shard = bisect.bisect_right(self._ends, index)
    position = index - (self._ends[shard - 1] if shard else 0)
    return decode_record(self._reader(shard).read(position, position + 1)[0])

  def __getstate__(self):  # worker processes reopen the files themselves
    return {'paths': self._paths, 'ends': self._ends}

  def __setstate__(self, state):
    self._paths, self._ends = state['paths'], state['ends']
    self._lock = threading.Lock()
    self._readers = [None] * len(self._paths)


def _open_reader(path: str):
  from array_record.python import array_record_module
  # No readahead: reads are random, one record each.
  return array_record_module.ArrayRecordReader(path,
                                               'readahead_buffer_size:0')


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
