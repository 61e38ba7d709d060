"""A damaged prepared store: one record that cannot be used is passed over
without stopping the run, and the count of such records is in the metrics; a
store that does not fit the config, or lacks its statistics, is refused at
start with what to do about it."""

import io
import os
import shutil
import struct

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import (imagenet, loader_benchmark, metrics_io, store, train,
                         validation)
from configs import default

NUM_TRAIN, NUM_EVAL, NUM_CLASSES = 16, 4, 3
STORED, SIZE = 80, 67        # small stand-ins for 256 and 227
BATCH = 8                    # 2 steps per epoch
STEPS_PER_EPOCH = NUM_TRAIN // BATCH
SEED = 0
BAD_INDEX = 5                # in the first of the two training shards
# What a training batch holds per example.
EXAMPLE_KEYS = ('image', 'label', 'offset', 'flip', 'lighting')


def _bad_record(kind, label, jpeg):
  if kind == 'not_an_image':
    return store.encode_record(label, b'\x00\xffnot a JPEG' * 40)
  if kind == 'truncated_jpeg':
    return store.encode_record(label, jpeg[:len(jpeg) // 2])
  if kind == 'short_record':
    return b'\x01\x02'       # not even the 4-byte label
  if kind == 'label_out_of_range':
    return store.encode_record(NUM_CLASSES + 4, jpeg)
  if kind == 'wrong_size':
    small = loader_benchmark.natural_image(np.random.default_rng(7), 40)
    return store.encode_record(label, loader_benchmark.encode_jpeg(small))
  raise ValueError(kind)


KINDS = ('not_an_image', 'truncated_jpeg', 'short_record',
         'label_out_of_range', 'wrong_size')


def _make_store(directory, bad_kind=None):
  """The fake store; with `bad_kind`, training record BAD_INDEX replaced by a
  record of that kind, every other byte the same."""
  info = loader_benchmark.write_fake_store(
      directory, NUM_TRAIN, NUM_EVAL, num_classes=NUM_CLASSES, size=STORED,
      shards=2)
  if bad_kind is not None:
    shard = info.shards['train'][0]
    source = store.SplitSource(directory, 'train')
    records = [store.encode_record(*source[i]) for i in range(NUM_TRAIN // 2)]
    records[BAD_INDEX] = _bad_record(bad_kind, *source[BAD_INDEX])
    store.write_shard(os.path.join(directory, shard), records)
  return directory


def _usable(directory, index) -> bool:
  """Whether training record `index` holds a label and an image the
  pipeline can use, decided here independently of imagenet.py."""
  try:
    label, jpeg = store.SplitSource(directory, 'train')[index]
    image = np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB'))
  except (struct.error, OSError, ValueError):
    return False
  return 0 <= label < NUM_CLASSES and image.shape == (STORED, STORED, 3)


def _take(batches, count):
  out = [next(batches) for _ in range(count)]
  batches.close()
  return out


def _rows(step):
  """The example indices of training step `step`, in batch order."""
  epoch, position = divmod(step, STEPS_PER_EPOCH)
  order = np.random.default_rng([SEED, epoch]).permutation(NUM_TRAIN)
  return order[position * BATCH:(position + 1) * BATCH]


@pytest.mark.parametrize('kind', KINDS)
def test_unusable_record_is_replaced_and_the_batch_stays_full(kind,
                                                              tmp_path):
  clean_dir = _make_store(str(tmp_path / 'clean'))
  bad_dir = _make_store(str(tmp_path / 'bad'), kind)
  # The fault is real, and only where it was put.
  assert not _usable(bad_dir, BAD_INDEX)
  assert _usable(clean_dir, BAD_INDEX) and _usable(bad_dir, BAD_INDEX + 1)

  clean = imagenet.PreparedDataset(clean_dir, SIZE, workers=2)
  bad = imagenet.PreparedDataset(bad_dir, SIZE, workers=2)
  steps = 2 * STEPS_PER_EPOCH   # the bad record comes once per epoch
  got = _take(bad.train_batches(batch_size=BATCH, seed=SEED), steps)
  again = _take(bad.train_batches(batch_size=BATCH, seed=SEED), steps)
  want = _take(clean.train_batches(batch_size=BATCH, seed=SEED), steps)
  resumed = _take(bad.train_batches(batch_size=BATCH, seed=SEED,
                                    start_step=steps - 1), 1)[0]

  replaced = 0
  for step in range(steps):
    image, label = got[step]['image'], got[step]['label']
    assert image.shape == (BATCH, SIZE, SIZE, 3), image.shape
    assert label.shape == (BATCH,), label.shape
    assert ((0 <= label) & (label < NUM_CLASSES)).all(), label
    for key in EXAMPLE_KEYS:
      # The replacement is deterministic: the same on every pass.
      np.testing.assert_array_equal(got[step][key], again[step][key])
    for row, index in enumerate(_rows(step)):
      if index == BAD_INDEX:
        replaced += 1
        continue
      # Every other example is the one an intact store gives.
      for key in EXAMPLE_KEYS:
        np.testing.assert_array_equal(got[step][key][row],
                                      want[step][key][row])
  assert replaced == 2
  # A run resumed at the last step reads what the whole run read there.
  for key in EXAMPLE_KEYS:
    np.testing.assert_array_equal(resumed[key], got[-1][key])


def _config(store_dir, steps):
  config = default.get_config('synthetic')
  config.dataset = 'folder'
  config.store_dir = store_dir
  config.model.num_classes = NUM_CLASSES
  config.image_size = SIZE
  config.batch_size = BATCH
  config.eval_batch_size = NUM_EVAL
  config.num_train_steps = steps
  config.log_every_steps = 1
  config.checkpoint_every_steps = STEPS_PER_EPOCH
  config.seed = SEED
  config.input.workers = 2
  return config


@pytest.fixture(scope='module')
def bad_store(tmp_path_factory):
  return _make_store(str(tmp_path_factory.mktemp('bad_store')),
                     'not_an_image')


def test_training_goes_on_and_counts_skipped_images(bad_store, tmp_path):
  # Metrics step s is the update made from data step s - 1; the count is
  # cumulative, and a resumed run carries it on from its checkpoint.
  expected = np.cumsum([BAD_INDEX in _rows(s) for s in range(2 * 2)])
  workdir = str(tmp_path / 'work')
  train.train_and_evaluate(_config(bad_store, 2), workdir)
  final = train.train_and_evaluate(_config(bad_store, 4), workdir)
  assert final['step'] == 4
  records = [r for r in metrics_io.read_metrics(workdir)
             if r['split'] == 'train']
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert all('skipped_images' in r for r in records), records
  assert [r['skipped_images'] for r in records] == expected.tolist()
  assert records[-1]['skipped_images'] == 2   # one per epoch


def _no_compiling(*args, **kwargs):
  raise AssertionError('compiled before the dataset was checked')


def test_class_count_that_disagrees_says_what_to_set(bad_store, tmp_path,
                                                     monkeypatch):
  config = _config(bad_store, 2)
  config.model.num_classes = 10
  monkeypatch.setattr(jax, 'jit', _no_compiling)
  monkeypatch.setattr(jax, 'eval_shape', _no_compiling)
  workdir = tmp_path / 'work'
  with pytest.raises(validation.ConfigError) as error:
    train.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  assert 'config.model.num_classes=10' in message, message
  assert f'{NUM_CLASSES} classes' in message, message
  # What to do, spelled as the flag to pass.
  assert f'--config.model.num_classes={NUM_CLASSES}' in message, message
  assert not (workdir / 'checkpoints').exists()


@pytest.mark.parametrize('missing', [store.STATS, store.MEAN_IMAGE])
def test_store_without_statistics_is_refused_at_start(missing, bad_store,
                                                      tmp_path, monkeypatch):
  store_dir = str(tmp_path / 'store')
  shutil.copytree(bad_store, store_dir)
  os.remove(os.path.join(store_dir, missing))
  monkeypatch.setattr(jax, 'jit', _no_compiling)
  monkeypatch.setattr(jax, 'eval_shape', _no_compiling)
  # StoreError is a FileNotFoundError: the command line prints it as an
  # error, without a traceback.
  with pytest.raises(store.StoreError) as error:
    train.train_and_evaluate(_config(store_dir, 2), str(tmp_path / 'work'))
  message = str(error.value)
  assert missing in message, message
  assert store_dir in message, message
  assert 'python -m alexnet_jax.prepare' in message, message
