"""The prepared-store input pipeline: order, augmentation, resume, processes,
evaluation and the ten-patch prediction, on a tiny store written here. The
loader's batches become, on the accelerator, the inputs that the NumPy
specification (`augment.py`) makes of the same records."""

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import augment, device_augment, imagenet, loader_benchmark
from alexnet_jax import store

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_EVAL, NUM_CLASSES = 40, 12, 3
STORED, SIZE = 80, 67        # small stand-ins for 256 and 227
BATCH = 8                    # 5 steps per epoch
SEED = 3
TRAIN_KEYS = ('image', 'label', 'offset', 'flip', 'lighting', 'skipped')
EVAL_KEYS = ('image', 'label', 'mask')
# On the 0..255 scale of the pixels.
TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def store_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('store'))
  loader_benchmark.write_fake_store(directory, NUM_TRAIN, NUM_EVAL,
                                    num_classes=NUM_CLASSES, size=STORED,
                                    shards=2)
  return directory


@pytest.fixture(scope='module')
def dataset(store_dir):
  return imagenet.PreparedDataset(store_dir, SIZE)


def decoded(store_dir, split, index):
  """What the store holds at `index`, decoded independently of imagenet.py."""
  label, jpeg = store.SplitSource(store_dir, split)[index]
  return label, np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB'))


def assert_same_inputs(other, dataset):
  """Two datasets' first training batches and evaluation batches agree."""
  assert_same_batches(
      take(other.train_batches(batch_size=BATCH, seed=SEED), 2),
      take(dataset.train_batches(batch_size=BATCH, seed=SEED), 2),
      TRAIN_KEYS)
  assert_same_batches(list(other.eval_batches(batch_size=NUM_EVAL)),
                      list(dataset.eval_batches(batch_size=NUM_EVAL)),
                      EVAL_KEYS)


def take(batches, count):
  out = [next(batches) for _ in range(count)]
  batches.close()
  return out


def assert_same_batches(got, want, keys):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert sorted(a) == sorted(keys)
    for key in keys:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_describes_the_store(dataset):
  assert (dataset.num_train, dataset.num_eval) == (NUM_TRAIN, NUM_EVAL)
  assert dataset.num_classes == NUM_CLASSES
  assert dataset.steps_per_epoch(BATCH) == 5


def test_train_batches_follow_the_epoch_order_and_per_example_augmentation(
    store_dir, dataset):
  stats = store.Statistics.load(store_dir)
  batches = take(dataset.train_batches(batch_size=BATCH, seed=SEED), 7)
  for step, batch in enumerate(batches):   # steps 5 and 6 are epoch 1
    # One byte per input value, and a few per example.
    assert batch['image'].shape == (BATCH, SIZE, SIZE, 3)
    assert batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32
    assert batch['offset'].shape == (BATCH, 2)
    epoch, position = divmod(step, 5)
    order = np.random.default_rng([SEED, epoch]).permutation(NUM_TRAIN)
    inputs = device_augment.network_inputs(batch, dataset.preprocessing,
                                           train=True)
    for n, index in enumerate(order[position * BATCH:(position + 1) * BATCH]):
      label, image = decoded(store_dir, 'train', index)
      assert batch['label'][n] == label == index % NUM_CLASSES
      top, left, flip, colour = augment.train_draws(
          (STORED, STORED), SIZE, stats.eigval, stats.eigvec,
          np.random.default_rng([SEED, epoch, index]))
      assert tuple(batch['offset'][n]) == (top, left)
      assert batch['flip'][n] == flip
      np.testing.assert_array_equal(batch['lighting'][n], colour)
      np.testing.assert_array_equal(batch['image'][n],
                                    image[top:top + SIZE, left:left + SIZE])
      expected = augment.train_example(
          image, stats.mean_image, SIZE, stats.eigval, stats.eigvec,
          np.random.default_rng([SEED, epoch, index]), 0.1)
      np.testing.assert_allclose(inputs[n], expected, rtol=0, atol=TOLERANCE)


def test_train_batches_are_deterministic_for_a_seed(dataset):
  first = take(dataset.train_batches(batch_size=BATCH, seed=SEED), 2)
  second = take(dataset.train_batches(batch_size=BATCH, seed=SEED), 2)
  other = take(dataset.train_batches(batch_size=BATCH, seed=SEED + 1), 2)
  assert_same_batches(first, second, TRAIN_KEYS)
  for a, c in zip(first, other):
    assert not np.array_equal(a['offset'], c['offset'])


def test_resuming_mid_epoch_reads_what_an_uninterrupted_run_reads(dataset):
  run = take(dataset.train_batches(batch_size=BATCH, seed=SEED), 10)
  resumed = take(dataset.train_batches(batch_size=BATCH, seed=SEED,
                                       start_step=7), 3)
  # Epoch 1, positions 2 to 4.
  assert_same_batches(resumed, run[7:], TRAIN_KEYS)


def test_two_processes_rows_make_the_global_batch(dataset):
  whole = take(dataset.train_batches(batch_size=BATCH, seed=SEED,
                                     start_step=3), 3)
  parts = [take(dataset.train_batches(batch_size=BATCH, seed=SEED,
                                      start_step=3, rows=rows), 3)
           for rows in ((0, 4), (4, 8))]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a}
            for a, b in zip(*parts)]
  assert_same_batches(joined, whole, TRAIN_KEYS)
  eval_whole = list(dataset.eval_batches(batch_size=BATCH))
  eval_parts = [list(dataset.eval_batches(batch_size=BATCH, rows=rows))
                for rows in ((0, 4), (4, 8))]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a}
            for a, b in zip(*eval_parts)]
  assert_same_batches(joined, eval_whole, EVAL_KEYS)


def test_worker_processes_do_not_change_the_batches(store_dir, dataset):
  parallel = imagenet.PreparedDataset(store_dir, SIZE, workers=2,
                                      processes=2)
  expected = take(dataset.train_batches(batch_size=BATCH, seed=SEED,
                                        start_step=4), 3)
  got = take(parallel.train_batches(batch_size=BATCH, seed=SEED,
                                    start_step=4), 3)
  assert_same_batches(got, expected, TRAIN_KEYS)
  # 3 evaluation batches over 2 processes: one makes two, the other one.
  expected = list(dataset.eval_batches(batch_size=5))
  got = list(parallel.eval_batches(batch_size=5))
  assert len(got) == 3
  assert_same_batches(got, expected, EVAL_KEYS)


def test_eval_batches_cover_every_example_once(store_dir, dataset):
  # 12 examples in batches of 5: the third batch holds 2 and 3 padded rows.
  stats = store.Statistics.load(store_dir)
  batches = list(dataset.eval_batches(batch_size=5))
  assert len(batches) == 3
  for batch in batches:
    # The stored image itself, once: the accelerator cuts the patch.
    assert batch['image'].shape == (5, STORED, STORED, 3)
    assert batch['image'].dtype == np.uint8
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [1.0] * NUM_EVAL + [0.0] * 3)
  images = np.concatenate([b['image'] for b in batches])[:NUM_EVAL]
  labels = np.concatenate([b['label'] for b in batches])[:NUM_EVAL]
  inputs = device_augment.network_inputs({'image': images},
                                          dataset.preprocessing, train=False)
  for index in range(NUM_EVAL):
    label, image = decoded(store_dir, 'validation', index)
    assert labels[index] == label
    np.testing.assert_array_equal(images[index], image)
    np.testing.assert_allclose(
        inputs[index],
        augment.eval_example(image, stats.mean_image, SIZE), rtol=0,
        atol=TOLERANCE)


def test_ten_crop_eval_batches(store_dir, dataset, monkeypatch):
  stats = store.Statistics.load(store_dir)
  ten = imagenet.PreparedDataset(store_dir, SIZE, ten_crop=True, workers=4)
  # Room for one batch only: one thread, nothing prefetched, same batches.
  monkeypatch.setattr(imagenet, 'IN_FLIGHT_BYTES', 1)
  batches = list(ten.eval_batches(batch_size=5))
  # The same images go to the device: it cuts the ten patches of each.
  assert_same_batches(batches, list(dataset.eval_batches(batch_size=5)),
                      EVAL_KEYS)
  assert ten.preprocessing.patches == augment.ten_crop_positions(
      STORED, STORED, SIZE)
  patches = device_augment.network_inputs(batches[0], ten.preprocessing,
                                          train=False)
  assert patches.shape == (5, 10, SIZE, SIZE, 3)
  _, image = decoded(store_dir, 'validation', 1)
  np.testing.assert_allclose(
      patches[1], augment.eval_example(image, stats.mean_image, SIZE,
                                       ten=True), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize('decoder', ['pil', 'cv2'])
def test_every_decoder_gives_the_same_batches(store_dir, dataset, decoder):
  if decoder == 'cv2':
    pytest.importorskip('cv2')
  other = imagenet.PreparedDataset(store_dir, SIZE, decoder=decoder)
  assert_same_inputs(other, dataset)


def _writer_options(path):
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.writer_options_string()
  finally:
    reader.close()


def _rewrite_shard(path, options):
  """Writes the shard's records again with ArrayRecord writer `options`."""
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  records = reader.read_all()
  reader.close()
  writer = array_record_module.ArrayRecordWriter(path, options)
  for record in records:
    writer.write(record)
  writer.close()


def test_a_store_with_zstd_records_reads_the_same(store_dir, dataset,
                                                  tmp_path):
  # Stores are written uncompressed; those written before were zstd, the
  # ArrayRecord default, and stay readable.
  old = str(tmp_path / 'zstd')
  shutil.copytree(store_dir, old)
  info = store.StoreInfo.load(old)
  for split in ('train', 'validation'):
    for shard in info.shards[split]:
      path = os.path.join(old, shard)
      assert 'uncompressed' in _writer_options(path)
      _rewrite_shard(path, 'group_size:1')
      assert 'zstd' in _writer_options(path)
  other = imagenet.PreparedDataset(old, SIZE)
  assert_same_inputs(other, dataset)


def test_split_source_refuses_an_index_outside_the_split(store_dir):
  source = store.SplitSource(store_dir, 'train')
  assert len(source) == NUM_TRAIN
  for index in (-1, NUM_TRAIN):
    with pytest.raises(IndexError, match=f'record {index} of {NUM_TRAIN}'):
      source[index]  # pylint: disable=pointless-statement


def test_the_default_decoder_is_simplejpeg_and_else_pillow(monkeypatch):
  pytest.importorskip('simplejpeg')
  assert imagenet.default_decoder() == 'simplejpeg'
  monkeypatch.setitem(sys.modules, 'simplejpeg', None)   # not installed
  assert imagenet.default_decoder() == 'pil'


def test_a_batch_array_is_used_again_only_when_nothing_holds_it():
  pool = imagenet.BufferPool(limit_bytes=1 << 20)
  first = pool.empty((4, 8))
  view = first[1:]
  del first
  # A view of the array holds it (as a device transfer's does): a new one.
  second = pool.empty((4, 8))
  assert not np.shares_memory(second, view)
  del view
  assert pool.empty((4, 8)) is pool._arrays[0]
  assert pool.empty((2, 8)) is pool._arrays[2]   # one per shape in use
  # Past the limit, arrays are made and not kept.
  small = imagenet.BufferPool(limit_bytes=16)
  small.empty((4, 8))
  assert not small._arrays


def test_an_unfinished_store_is_refused(tmp_path):
  store.StoreInfo(name='x', class_names=['a']).save(str(tmp_path))
  with pytest.raises(store.StoreError, match='only partly prepared'):
    imagenet.PreparedDataset(str(tmp_path), SIZE)


def test_the_pipeline_never_imports_tensorflow(store_dir):
  script = (
      'import sys\n'
      'from alexnet_jax import imagenet\n'
      f'ds = imagenet.PreparedDataset({store_dir!r}, {SIZE})\n'
      f'next(ds.train_batches(batch_size={BATCH}, seed=0))\n'
      f'next(ds.eval_batches(batch_size={BATCH}))\n'
      'loaded = [m for m in ("tensorflow", "tensorflow_datasets") '
      'if m in sys.modules]\n'
      'assert not loaded, loaded\n'
      'print("ok")\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ok'


def test_ten_crop_evaluation_averages_the_softmax(store_dir, tmp_path):
  import jax
  from alexnet_jax import checkpointing, evaluate, models, optim, parallel, train
  from configs import default

  config = default.get_config('synthetic')
  config.dataset = 'imagenet2012'
  config.model.num_classes = NUM_CLASSES
  config.image_size = SIZE
  config.parallelism = 'data'
  config.num_devices = 2
  config.eval_batch_size = 8
  config.store_dir = store_dir
  config.model.init_scheme = 'he'   # predictions that differ between patches

  scheme = parallel.make_scheme('data', jax.devices()[:2])
  model = models.from_config(config)
  tx = optim.make_optimizer(config)
  state, _ = train.create_train_state(model, tx, scheme, SIZE, seed=1)
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=1)
  ckpt.save(5, state, optim.init_schedule_state(config), {})
  ckpt.wait()
  ckpt.close()

  ten = evaluate.evaluate_checkpoint(config, str(tmp_path), ten_crop=True)
  one = evaluate.evaluate_checkpoint(config, str(tmp_path))

  ten_crop = imagenet.PreparedDataset(store_dir, SIZE, ten_crop=True)
  patches = np.concatenate([
      device_augment.network_inputs(b, ten_crop.preprocessing, train=False)
      for b in ten_crop.eval_batches(batch_size=NUM_EVAL)])
  labels = np.array([decoded(store_dir, 'validation', i)[0]
                     for i in range(NUM_EVAL)])
  logits = np.asarray(jax.jit(lambda p, x: model.apply(
      {'params': p}, x, train=False))(state['params'],
                                      patches.reshape(-1, SIZE, SIZE, 3)),
                      np.float64).reshape(NUM_EVAL, 10, NUM_CLASSES)
  softmax = np.exp(logits - logits.max(-1, keepdims=True))
  softmax /= softmax.sum(-1, keepdims=True)
  averaged = softmax.mean(1)
  assert ten['step'] == one['step'] == 5 and ten['patches'] == 10
  np.testing.assert_allclose(
      ten['loss'], -np.log(averaged[np.arange(NUM_EVAL), labels]).mean(),
      rtol=1e-4)
  assert ten['top1'] == pytest.approx(np.mean(averaged.argmax(-1) == labels))
  centre = softmax[:, 4]
  np.testing.assert_allclose(
      one['loss'], -np.log(centre[np.arange(NUM_EVAL), labels]).mean(),
      rtol=1e-4)
  assert one['top1'] == pytest.approx(np.mean(centre.argmax(-1) == labels))
  assert ten['top5'] == one['top5'] == 1.0   # 3 classes


def test_from_config_reads_the_input_fields(store_dir):
  import ml_collections
  config = ml_collections.ConfigDict({
      'store_dir': store_dir, 'ten_crop_eval': True,
      'input': {'lighting_sigma': 0.0, 'workers': -1}})
  dataset = imagenet.PreparedDataset.from_config(config, SIZE)
  assert dataset.lighting_sigma == 0.0 and dataset.ten_crop
  assert dataset.workers == dataset.threads == len(os.sched_getaffinity(0))
  assert dataset.processes == 0
  config.input.workers, config.input.processes = 5, 2
  dataset = imagenet.PreparedDataset.from_config(config, SIZE)
  assert (dataset.workers, dataset.processes, dataset.threads) == (5, 2, 3)
  assert not imagenet.PreparedDataset.from_config(
      config, SIZE, ten_crop=False).ten_crop
