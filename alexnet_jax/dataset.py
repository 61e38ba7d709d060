"""The interface every dataset follows, in its own module so that the small
datasets (`alexnet_jax.data`) and the prepared store (`alexnet_jax.imagenet`)
both build on it without importing each other.

Every dataset's batches have one form, which the step turns into network
inputs on the accelerator (`alexnet_jax.device_augment`):

  training    image, label, and per example offset [B, 2] (int32), flip [B]
              (uint8) and lighting [B, 3] (float32)
  evaluation  image, label, mask

Images are uint8 with the dataset's `preprocessing` constants (the prepared
store), or already network inputs in float16 with `preprocessing = None`
(digits, synthetic).
"""

from __future__ import annotations

import abc
from typing import Iterator

import numpy as np

Batch = dict[str, np.ndarray]


class Dataset(abc.ABC):
  name: str
  num_classes: int
  num_train: int
  num_eval: int
  # The constants that turn this dataset's images into network inputs on
  # the accelerator (`augment.Preprocessing`); None: they are inputs already.
  preprocessing = None

  def steps_per_epoch(self, batch_size: int) -> int:
    # The last partial batch is dropped: every step has the paper's batch size.
    return self.num_train // batch_size

  @abc.abstractmethod
  def _train_examples(self, indices: np.ndarray) -> Batch:
    """Training examples (augmented as the dataset needs) at these indices."""

  @abc.abstractmethod
  def _eval_examples(self, indices: np.ndarray) -> Batch:
    """Validation examples at these indices."""

  def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(self.num_train)

  def train_batches(self, *, batch_size: int, seed: int, start_step: int = 0,
                    rows: tuple[int, int] | None = None) -> Iterator[Batch]:
    """Rows [start, stop) of every global batch from `start_step` on (all rows
    by default)."""
    steps = self.steps_per_epoch(batch_size)
    first, last = rows or (0, batch_size)
    step = start_step
    while True:
      epoch, index = divmod(step, steps)
      order = self.epoch_order(seed, epoch)
      start = index * batch_size
      yield self._train_examples(order[start + first:start + last])
      step += 1

  def eval_batches(self, *, batch_size: int,
                   rows: tuple[int, int] | None = None) -> Iterator[Batch]:
    """The whole validation split, rows [start, stop) of each batch; the last
    batch is padded and `mask` marks the real examples, so that every one is
    counted exactly once."""
    first, last = rows or (0, batch_size)
    for start in range(0, self.num_eval, batch_size):
      indices = np.arange(start + first, start + last)
      mask = indices < self.num_eval
      batch = self._eval_examples(np.where(mask, indices, 0))
      batch['mask'] = mask.astype(np.float32)
      yield batch


def unaugmented(images: np.ndarray, labels: np.ndarray) -> Batch:
  """A training batch of network inputs that no augmentation changes: the
  whole image, never reflected, no lighting noise."""
  count = len(labels)
  return {'image': images, 'label': labels,
          'offset': np.zeros((count, 2), np.int32),
          'flip': np.zeros(count, np.uint8),
          'lighting': np.zeros((count, 3), np.float32)}
