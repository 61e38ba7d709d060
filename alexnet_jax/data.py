"""Datasets behind one small interface.

A dataset yields host-local NumPy batches. Every process computes the same
global batch order from (seed, epoch) and keeps the rows of each global batch
that its devices hold (`rows`, read from the batch sharding), so the examples a
step sees do not depend on how many processes share the work, and a run resumed
at step s reads exactly what an uninterrupted run reads from step s on.

  digits        scikit-learn's bundled handwritten digits: real data that
                ships inside the wheel, so a first run needs no download.
  synthetic     random images and labels, for benchmarks and smoke tests.
  imagenet2012  ILSVRC-2012, prepared once by `alexnet_jax.prepare` into a
  folder        store of 256x256 images (`alexnet_jax.imagenet` reads it).
"""

from __future__ import annotations

import numpy as np

# The interface, shared with alexnet_jax.imagenet.
from alexnet_jax.dataset import Batch, Dataset, unaugmented

DATASETS = ('digits', 'synthetic', 'imagenet2012', 'folder')


class Digits(Dataset):
  """1,797 8x8 digits (16 grey levels), resized to the network's input.

  A fixed permutation puts 300 in validation. Preprocessing follows the paper:
  scale, then subtract the training set's per-pixel mean image. The batches
  hold these network inputs in float16, as the dataset keeps them: 2 bytes a
  value to the device.
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
    # `predict` subtracts it from new images as from these.
    self.mean_image = mean_image
    self._train_images = (train - mean_image).astype(np.float16)
    self._eval_images = (resized[:self.num_eval_examples] - mean_image
                         ).astype(np.float16)
    self._train_labels = labels[self.num_eval_examples:]
    self._eval_labels = labels[:self.num_eval_examples]
    self.num_train = len(self._train_labels)
    self.num_eval = len(self._eval_labels)

  @staticmethod
  def _rgb(images):
    return np.repeat(images[..., None], 3, axis=-1)

  def _train_examples(self, indices):
    return unaugmented(self._rgb(self._train_images[indices]),
                       self._train_labels[indices])

  def _eval_examples(self, indices):
    return {'image': self._rgb(self._eval_images[indices]),
            'label': self._eval_labels[indices]}


class Synthetic(Dataset):
  """Gaussian images and uniform labels, generated per example index; the
  images are network inputs in float16."""

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
    images = np.empty((len(indices), *shape), np.float16)
    labels = np.empty(len(indices), np.int32)
    for n, index in enumerate(indices):
      rng = np.random.default_rng([split, int(index)])
      images[n] = rng.standard_normal(shape, dtype=np.float32)
      labels[n] = rng.integers(0, self.num_classes)
    return {'image': images, 'label': labels}

  def _train_examples(self, indices):
    batch = self._examples(indices, 0)
    return unaugmented(batch['image'], batch['label'])

  def _eval_examples(self, indices):
    return self._examples(indices, 1)

  def epoch_order(self, seed, epoch):
    # Synthetic data has no order to shuffle; keeping it sequential makes each
    # batch a function of its position only.
    return np.arange(self.num_train)


IMAGENET_HELP = """\
{problem}
ImageNet comes from the two ILSVRC-2012 archives, which you download yourself
(https://image-net.org, after registering):
  ILSVRC2012_img_train.tar  (138 GB)
  ILSVRC2012_img_val.tar    (6.3 GB)
Put both in a directory DIR and prepare them once (TFDS builds imagenet2012,
then the paper's 256x256 images are written to STORE):
  pip install -r requirements-test.txt   # TensorFlow, for the TFDS build only
  python -m alexnet_jax.prepare --dataset=imagenet2012 --manual_dir=DIR --out=STORE
then train with --config.store_dir=STORE."""

FOLDER_HELP = """\
{problem}
Prepare a folder of images laid out as ROOT/<class>/<image> once with
  python -m alexnet_jax.prepare --dataset=folder --source=ROOT --out=STORE
then train with --config.store_dir=STORE."""


def get_dataset(config, image_size: int) -> Dataset:
  name = config.dataset
  if name == 'digits':
    return Digits(image_size)
  if name == 'synthetic':
    return Synthetic(image_size, config.model.num_classes,
                     config.synthetic.num_train, config.synthetic.num_eval)
  if name in ('imagenet2012', 'folder'):
    from alexnet_jax import imagenet, store  # grain and array_record
    help_text = IMAGENET_HELP if name == 'imagenet2012' else FOLDER_HELP
    try:
      store.check_store(config.store_dir)
    except store.StoreError as e:
      raise store.StoreError(help_text.format(problem=e)) from None
    return imagenet.PreparedDataset.from_config(config, image_size)
  raise ValueError(f'config.dataset must be one of {DATASETS}, got {name!r}')
