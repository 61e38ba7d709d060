"""Datasets behind one small interface.

A dataset yields host-local NumPy batches. Every process computes the same
global batch order from (seed, epoch) and keeps the rows of each global batch
that its devices hold (`rows`, read from the batch sharding), so the examples a
step sees do not depend on how many processes share the work, and a run resumed
at step s reads exactly what an uninterrupted run reads from step s on.

  digits        scikit-learn's bundled handwritten digits: real data that
                ships inside the wheel, so a first run needs no download.
  synthetic     random images and labels, for benchmarks and smoke tests.
  imagenet2012  ILSVRC-2012 through TFDS (see `check_imagenet`).
"""

from __future__ import annotations

import abc
import os
from typing import Iterator

import numpy as np

DATASETS = ('digits', 'synthetic', 'imagenet2012')
Batch = dict[str, np.ndarray]


class Dataset(abc.ABC):
  name: str
  num_classes: int
  num_train: int
  num_eval: int

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


class Digits(Dataset):
  """1,797 8x8 digits (16 grey levels), resized to the network's input.

  A fixed permutation puts 300 in validation. Preprocessing follows the paper:
  scale, then subtract the training set's per-pixel mean image.
  """

  name = 'digits'
  num_classes = 10
  num_eval_examples = 300

  def __init__(self, image_size: int):
    from sklearn import datasets as sk_datasets  # only this dataset needs it
    import jax
    digits = sk_datasets.load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    resized = jax.device_get(jax.image.resize(
        images, (len(images), image_size, image_size), 'bilinear'))
    train = resized[self.num_eval_examples:]
    mean_image = train.mean(axis=0)
    self._train_images = (train - mean_image).astype(np.float16)
    self._eval_images = (resized[:self.num_eval_examples] - mean_image
                         ).astype(np.float16)
    self._train_labels = labels[self.num_eval_examples:]
    self._eval_labels = labels[:self.num_eval_examples]
    self.num_train = len(self._train_labels)
    self.num_eval = len(self._eval_labels)

  @staticmethod
  def _rgb(images):
    return np.repeat(images[..., None].astype(np.float32), 3, axis=-1)

  def _train_examples(self, indices):
    return {'image': self._rgb(self._train_images[indices]),
            'label': self._train_labels[indices]}

  def _eval_examples(self, indices):
    return {'image': self._rgb(self._eval_images[indices]),
            'label': self._eval_labels[indices]}


class Synthetic(Dataset):
  """Gaussian images and uniform labels, generated per example index."""

  name = 'synthetic'

  def __init__(self, image_size: int, num_classes: int, num_train: int,
               num_eval: int):
    self.image_size = image_size
    self.num_classes = num_classes
    self.num_train = num_train
    self.num_eval = num_eval

  def _examples(self, indices, split):
    # One generator per example, so that an example is the same whichever
    # process, and whichever slice of the batch, asks for it.
    shape = (self.image_size, self.image_size, 3)
    images = np.empty((len(indices), *shape), np.float32)
    labels = np.empty(len(indices), np.int32)
    for n, index in enumerate(indices):
      rng = np.random.default_rng([split, int(index)])
      images[n] = rng.standard_normal(shape, dtype=np.float32)
      labels[n] = rng.integers(0, self.num_classes)
    return {'image': images, 'label': labels}

  def _train_examples(self, indices):
    return self._examples(indices, 0)

  def _eval_examples(self, indices):
    return self._examples(indices, 1)

  def epoch_order(self, seed, epoch):
    # Synthetic data has no order to shuffle; keeping it sequential makes each
    # batch a function of its position only.
    return np.arange(self.num_train)


IMAGENET_HELP = """\
ImageNet (imagenet2012) is not prepared in {data_dir}.
TFDS builds it from the two ILSVRC-2012 archives, which you download yourself
(https://image-net.org, after registering):
  ILSVRC2012_img_train.tar  (138 GB)
  ILSVRC2012_img_val.tar    (6.3 GB)
Put both in {manual_dir}, then prepare the dataset once with TFDS, e.g.
  python -c "import tensorflow_datasets as tfds; tfds.builder('imagenet2012', data_dir='{data_dir}').download_and_prepare(file_format='array_record')"
and pass --config.data_dir={data_dir} if it is not the default."""


def check_imagenet(data_dir: str | None) -> str:
  """Fail at once, with the way to fix it, when ImageNet is not prepared."""
  data_dir = data_dir or os.environ.get(
      'TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))
  prepared = os.path.join(data_dir, 'imagenet2012')
  if not os.path.isdir(prepared) or not os.listdir(prepared):
    manual_dir = os.path.join(data_dir, 'downloads', 'manual')
    raise FileNotFoundError(IMAGENET_HELP.format(data_dir=data_dir,
                                                 manual_dir=manual_dir))
  return prepared


def get_dataset(config, image_size: int) -> Dataset:
  name = config.dataset
  if name == 'digits':
    return Digits(image_size)
  if name == 'synthetic':
    return Synthetic(image_size, config.model.num_classes,
                     config.synthetic.num_train, config.synthetic.num_eval)
  if name == 'imagenet2012':
    check_imagenet(config.data_dir)
    raise NotImplementedError(
        'Training on imagenet2012 needs the ImageNet input pipeline, which '
        'this version does not include yet; use dataset=digits or synthetic.')
  raise ValueError(f'config.dataset must be one of {DATASETS}, got {name!r}')
