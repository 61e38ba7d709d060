"""Classifies image files with a trained or converted run: the top-k classes.

    python -m alexnet_jax.predict --workdir=DIR [--top_k=5] [--step=N]
        [--store_dir=STORE] IMAGE...

prints each image's path and its k most probable classes with their softmax
probabilities. An image is given to the network as the run's evaluation gives
it a validation image (DIR/config.json says which dataset that was):

  imagenet2012, folder  decoded to RGB as `prepare` decodes (CMYK, grey,
                        palette, PNG under a .JPEG name), the shorter side
                        rescaled to 256 and the central 256x256 crop, stored
                        as JPEG as the prepared store stores it, normalised by
                        `input.normalization` ('mean_image' reads the store's
                        mean image: --store_dir if the store has moved), and
                        the centre patch of the network's input size.
  digits                grey levels 0..1 with the ink bright, as the dataset
                        has them (a dark-on-light image is inverted), reduced
                        to the dataset's 8x8, then resized and centred
                        exactly as `data.Digits` does.

A file that is not an image gets a line on stderr and the others are still
classified; the exit status is then 1. From Python:

    p = predict.Predictor.from_workdir(DIR)
    p.classify_files(['cat.jpg'])   # [Result(path, top=[(name, p), ...], error)]
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

import jax
import numpy as np
from absl import app, flags, logging
from PIL import Image, UnidentifiedImageError

from alexnet_jax import (augment, data, device_augment, prepare, runs, store,
                         validation)

# The resolution of scikit-learn's digits: every image is brought to it, so
# that a photograph of a digit is as blurred as the training images.
DIGITS_SIZE = 8


class PredictError(ValueError):
  """A run that cannot classify images as asked; the message says why."""


@dataclasses.dataclass
class Result:
  path: str
  # (class name, probability), most probable first; None when `error` is set.
  top: list[tuple[str, float]] | None
  error: str | None


def read_image(path: str) -> Image.Image:
  """A file as RGB, decoded as `prepare` decodes the training images."""
  with open(path, 'rb') as f:
    return prepare.decode_rgb(f.read())


def _read(path: str) -> tuple[Image.Image | None, str | None]:
  """(image, None), or (None, why it gives no image)."""
  try:
    with open(path, 'rb') as f:
      encoded = f.read()
  except FileNotFoundError:
    return None, 'no such file'
  except IsADirectoryError:
    return None, 'a directory, not an image file'
  except OSError as e:
    return None, f'cannot be read ({e.strerror or e})'
  try:
    return prepare.decode_rgb(encoded), None
  except UnidentifiedImageError:
    return None, 'not an image (no format Pillow reads)'
  except Exception as e:  # pylint: disable=broad-except
    # Whatever a broken file makes Pillow raise (OSError for a truncated
    # file, SyntaxError, DecompressionBombError, ...) is a fact about it.
    return None, f'not an image ({type(e).__name__}: {e})'


def class_names(config) -> list[str]:
  """Index -> name: ImageNet's human-readable names, a folder's class
  folders (read from its store), the digits, or 'class N'."""
  count = config.model.num_classes
  if config.dataset == 'digits':
    return [str(i) for i in range(count)]
  if config.dataset == 'imagenet2012' and count == 1000:
    # TFDS's copy of the standard class order; importing it does not import
    # TensorFlow.
    from tensorflow_datasets.datasets.siscore import labels
    return list(labels.IMAGENET_LABELS_LIST)
  if config.dataset == 'folder' and config.store_dir:
    try:
      info = store.StoreInfo.load(config.store_dir)
    except OSError:
      info = None
    if info is not None and info.num_classes == count:
      return list(info.class_names)
  return [f'class {i}' for i in range(count)]


class StoreInputs:
  """Network inputs from RGB images, as evaluation makes its centre-patch
  inputs from the store's records: the same stored image, through the same
  accelerator function."""

  def __init__(self, config, image_size: int):
    name = config.input.normalization
    store_dir = config.store_dir
    info = None
    if store_dir and os.path.exists(os.path.join(store_dir, store.INFO)):
      info = store.StoreInfo.load(store_dir)
    if name == 'mean_image':
      if not (store_dir and os.path.exists(
          os.path.join(store_dir, store.MEAN_IMAGE))):
        raise PredictError(
            "config.input.normalization='mean_image' subtracts the mean "
            'image of the prepared store the run trained on, and '
            f'config.store_dir={store_dir!r} holds none: pass '
            '--store_dir=STORE (store_dir=STORE from Python) where the store '
            'is now.')
      mean_image = store.Statistics.load(store_dir).mean_image
    else:
      # Only its shape is read: torchvision's statistics are constants.
      mean_image = np.zeros((prepare.IMAGE_SIZE, prepare.IMAGE_SIZE, 3))
    self.preprocessing = augment.Preprocessing.create(name, mean_image,
                                                      image_size)
    # The store's JPEG round trip, so that a file gives the very pixels its
    # record would; without a store, prepare's default quality.
    self.quality = (info or store.StoreInfo('', [])).jpeg_quality
    self.image_size = image_size

  def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
    stored = np.empty((len(images), prepare.IMAGE_SIZE, prepare.IMAGE_SIZE, 3),
                      np.uint8)
    for n, image in enumerate(images):
      jpeg = prepare.encode_jpeg(prepare.central_crop(image.convert('RGB')),
                                 self.quality)
      stored[n] = prepare.jpeg_pixels(jpeg)
    return device_augment.network_inputs({'image': stored},
                                         self.preprocessing, train=False)


def digit_grey_levels(image: Image.Image) -> np.ndarray:
  """A digit as the dataset holds one: 8x8 grey levels in 0..1, ink bright.

  Ink on paper is dark on light: an image whose border is brighter than its
  average is inverted. A non-square image is padded with background to a
  square, keeping the digit's proportions, and averaged down (box filter).
  """
  grey = np.asarray(image.convert('L'), np.float32) / 255.0
  border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
  if border.mean() > grey.mean():
    grey = 1.0 - grey
  height, width = grey.shape
  side = max(height, width)
  square = np.zeros((side, side), np.float32)
  top, left = (side - height) // 2, (side - width) // 2
  square[top:top + height, left:left + width] = grey
  return np.asarray(Image.fromarray(square).resize(
      (DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BOX))


class DigitsInputs:
  """Network inputs from images of digits, as `data.Digits` makes them."""

  def __init__(self, image_size: int):
    self.image_size = image_size
    self.mean_image = data.Digits(image_size).mean_image

  def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
    size = self.image_size
    digits = np.stack([digit_grey_levels(image) for image in images])
    resized = jax.device_get(jax.image.resize(
        digits, (len(digits), size, size), 'bilinear'))
    # Digits keeps its images in float16: the same rounding here makes an
    # image of a validation digit the very input evaluation gives it.
    centred = (resized - self.mean_image).astype(np.float16)
    return np.repeat(centred[..., None].astype(np.float32), 3, axis=-1)


def make_inputs(config):
  """`images -> network inputs` for the dataset the run trained on."""
  size = validation.image_size(config)
  if config.dataset in ('imagenet2012', 'folder'):
    return StoreInputs(config, size)
  if config.dataset == 'digits':
    return DigitsInputs(size)
  raise PredictError(
      f'config.dataset={config.dataset!r}: a run trained on random data has '
      'no image preprocessing to apply to a file; classify with a run of '
      "'digits', 'imagenet2012' or 'folder'.")


class Predictor:
  """A run's network in test mode on one device, with its preprocessing.

  Images go through in batches of at most `batch_size`, padded to a power of
  two, so a few shapes compile whatever the number of images.
  """

  def __init__(self, run: runs.Run, *, inputs=None, batch_size: int = 32):
    self.config = run.config
    self.step = run.step
    self.class_names = class_names(run.config)
    self.inputs = inputs if inputs is not None else make_inputs(run.config)
    self.batch_size = batch_size
    self._x64 = run.config.model.dtype == 'float64'
    model = run.model()
    with jax.enable_x64(self._x64):
      self._params = jax.device_put(run.params, jax.local_devices()[0])
    self._softmax = jax.jit(lambda params, images: jax.nn.softmax(
        model.apply({'params': params}, images, train=False), axis=-1))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None,
                   store_dir: str | None = None) -> 'Predictor':
    """The run in `workdir` at checkpoint `step` (default: the latest);
    `store_dir` replaces the config's prepared store."""
    if not os.path.isfile(os.path.join(workdir, runs.CONFIG_FILE)):
      raise PredictError(
          f'{workdir} is not the directory of a run: it has no '
          f'{runs.CONFIG_FILE} (--workdir is the directory that '
          '`alexnet_jax.main` trained in or `alexnet_jax.convert` wrote).')
    config = runs.load_config(workdir)
    if store_dir is not None:
      config.store_dir = store_dir
    # Before the checkpoint is read: a missing store fails at once.
    inputs = make_inputs(config)
    return cls(runs.restore(workdir, config=config, step=step), inputs=inputs)

  def probabilities(self, inputs: np.ndarray) -> np.ndarray:
    """The softmax over the classes, [N, num_classes], of network inputs."""
    out = [np.zeros((0, len(self.class_names)), np.float32)]
    with jax.enable_x64(self._x64):
      for start in range(0, len(inputs), self.batch_size):
        chunk = inputs[start:start + self.batch_size]
        count = len(chunk)
        padded = min(self.batch_size, 1 << (count - 1).bit_length())
        chunk = np.concatenate(
            [chunk, np.zeros((padded - count, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(self._softmax(self._params, chunk))[:count])
    return np.concatenate(out)

  def top(self, probabilities: np.ndarray, top_k: int = 5
          ) -> list[list[tuple[str, float]]]:
    """The `top_k` most probable (name, probability) of each row."""
    if top_k < 1:
      raise ValueError(f'top_k={top_k} must be positive')
    k = min(top_k, len(self.class_names))
    order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
    return [[(self.class_names[i], float(row[i])) for i in indices]
            for row, indices in zip(probabilities, order)]

  def classify_images(self, images: Sequence[np.ndarray], top_k: int = 5
                      ) -> list[list[tuple[str, float]]]:
    """Top-k of uint8 images, HxWx3 (RGB) or HxW (grey)."""
    pictures = []
    for n, image in enumerate(images):
      image = np.asarray(image)
      if image.dtype != np.uint8 or not (
          image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f'images[{n}] is {image.dtype} {image.shape}; '
                         'expected uint8 HxWx3 (RGB) or HxW (grey)')
      pictures.append(Image.fromarray(image))
    if not pictures:
      return []
    return self.top(self.probabilities(self.inputs(pictures)), top_k)

  def classify_files(self, paths: Sequence[str], top_k: int = 5
                     ) -> list[Result]:
    """A Result per path, in order; a file that is not an image gets its
    `error` and the others are still classified."""
    results = []
    # One batch of files at a time: decoded images of a long list would not
    # all fit in memory.
    for start in range(0, len(paths), self.batch_size):
      batch = [Result(str(path), None, None)
               for path in paths[start:start + self.batch_size]]
      images, readable = [], []
      for result in batch:
        image, result.error = _read(result.path)
        if image is not None:
          images.append(image)
          readable.append(result)
      if images:
        tops = self.top(self.probabilities(self.inputs(images)), top_k)
        for result, top in zip(readable, tops):
          result.top = top
      results += batch
    return results


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give the image files to classify after the flags.')
  # Orbax logs every file it reads at INFO; the classes are what matters.
  logging.set_verbosity(logging.WARNING)
  args = flags.FLAGS
  try:
    predictor = Predictor.from_workdir(args.workdir, step=args.step,
                                       store_dir=args.store_dir)
  except (PredictError, validation.ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  failed = False
  for result in predictor.classify_files(paths, top_k=args.top_k):
    if result.error is not None:
      print(f'{result.path}: {result.error}', file=sys.stderr)
      failed = True
      continue
    print(result.path)
    for rank, (name, probability) in enumerate(result.top, 1):
      print(f'  {rank}. {name}  {100 * probability:.2f}%')
  sys.stdout.flush()
  if failed:
    sys.exit(1)


def _define_flags():
  # Defined only by the command, so that a notebook can import this module
  # beside `evaluate`, whose flags have the same names.
  flags.DEFINE_string('workdir', None, 'The run: a directory that '
                      'alexnet_jax.main trained in or alexnet_jax.convert '
                      'wrote.')
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image.',
                       lower_bound=1)
  flags.DEFINE_integer('step', None, 'The checkpoint to use (default: the '
                       'latest).')
  flags.DEFINE_string('store_dir', None, "The prepared store, if not the "
                      "config's store_dir ('mean_image' normalisation reads "
                      'its mean image, a folder its class names).')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  _define_flags()
  app.run(main)
