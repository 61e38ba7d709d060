"""A tiny ILSVRC-2012 with the two archives' real layout, for TFDS to build.

`ILSVRC2012_img_train.tar` holds one tar per synset (`n01440764.tar`) of
`<synset>_<k>.JPEG` files; `ILSVRC2012_img_val.tar` holds the flat files
`ILSVRC2012_val_00000001.JPEG` ... TFDS labels the validation files by their
sorted position in its own list of the 50,000 real labels, so the fake ones
carry the real first names and get those real labels.

The training files are non-square JPEGs plus the kinds of file real ImageNet
holds that a plain decoder gets wrong: a CMYK JPEG, a greyscale JPEG, a PNG
named .JPEG, and (not in ImageNet, but what a broken download leaves) a
truncated JPEG. None of them has a name TFDS fixes by itself, so the
preparation must handle them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile

import numpy as np
from PIL import Image

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
# Width x height, cycled through: landscape, portrait and a small one that the
# preparation has to enlarge.
SIZES = ((300, 200), (180, 320), (240, 240), (120, 90))


@dataclasses.dataclass
class FakeImage:
  file_name: str
  synset: str        # '' for validation files: TFDS labels those itself
  kind: str          # 'rgb', 'cmyk', 'grey', 'png' or 'truncated'
  colour: tuple[int, int, int]  # the mean RGB colour drawn
  size: tuple[int, int]


@dataclasses.dataclass
class FakeIlsvrc:
  train: list[FakeImage]
  validation: list[FakeImage]

  @property
  def truncated(self) -> list[FakeImage]:
    return [image for image in self.train if image.kind == 'truncated']


def _pixels(rng: np.random.Generator, size, colour) -> np.ndarray:
  """A smooth picture around `colour`: gradients compress like photographs,
  and the mean colour survives resizing, so a test can check it."""
  width, height = size
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  ramp = 40.0 * (x / width - 0.5) + 30.0 * np.sin(y / height * np.pi * 2)
  noise = rng.normal(0.0, 4.0, (height, width, 3))
  pixels = np.asarray(colour, np.float64) + ramp[..., None] + noise
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, kind: str) -> bytes:
  image = Image.fromarray(pixels, 'RGB')
  buffer = io.BytesIO()
  if kind == 'cmyk':
    image.convert('CMYK').save(buffer, 'JPEG', quality=95)
  elif kind == 'grey':
    image.convert('L').save(buffer, 'JPEG', quality=95)
  elif kind == 'png':
    image.save(buffer, 'PNG')
  else:
    image.save(buffer, 'JPEG', quality=95)
  data = buffer.getvalue()
  if kind == 'truncated':
    data = data[:len(data) * 3 // 5]  # a download cut off part-way
  return data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 0  # the archive's bytes depend on the seed only
  tar.addfile(info, io.BytesIO(data))


def make_fake_ilsvrc2012(manual_dir: str,
                         classes=('n01440764', 'n01443537', 'n01484850'),
                         per_class: int = 3, num_val: int = 4,
                         seed: int = 0) -> FakeIlsvrc:
  """Writes the two archives into `manual_dir` and describes what they hold.

  Args:
    manual_dir: created if missing.
    classes: synset ids; use real ones (TFDS's labels.txt), or TFDS cannot
      label the files.
    per_class: plain RGB JPEGs per synset; the four special files come on top,
      spread over the synsets.
    num_val: validation files, named as the first `num_val` real ones.
    seed: the pictures' noise and colours.

  Returns:
    The files written, with what each one is.
  """
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  specials = ('cmyk', 'grey', 'png', 'truncated')
  train = []
  by_synset = {synset: [] for synset in classes}
  for n in range(per_class * len(classes) + len(specials)):
    synset = classes[n % len(classes)]
    kind = specials[n - per_class * len(classes)] if (
        n >= per_class * len(classes)) else 'rgb'
    file_name = f'{synset}_{len(by_synset[synset]) + 1}.JPEG'
    colour = tuple(int(c) for c in rng.integers(60, 196, 3))
    image = FakeImage(file_name, synset, kind, colour, SIZES[n % len(SIZES)])
    by_synset[synset].append(image)
    train.append(image)

  with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), 'w') as outer:
    for synset, images in by_synset.items():
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        for image in images:
          _add(inner, image.file_name,
               _encode(_pixels(rng, image.size, image.colour), image.kind))
      _add(outer, f'{synset}.tar', inner_bytes.getvalue())

  validation = []
  with tarfile.open(os.path.join(manual_dir, VAL_TAR), 'w') as tar:
    for k in range(1, num_val + 1):
      colour = tuple(int(c) for c in rng.integers(60, 196, 3))
      image = FakeImage(f'ILSVRC2012_val_{k:08d}.JPEG', '', 'rgb', colour,
                        SIZES[k % len(SIZES)])
      _add(tar, image.file_name,
           _encode(_pixels(rng, image.size, image.colour), 'rgb'))
      validation.append(image)
  return FakeIlsvrc(train, validation)
