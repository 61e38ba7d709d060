"""The prepared-store input pipeline: order, augmentation, resume, processes,
evaluation and the ten-patch prediction, on a tiny store written here."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import augment, imagenet, loader_benchmark, store

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_EVAL, NUM_CLASSES = 40, 12, 3
STORED, SIZE = 80, 67        # small stand-ins for 256 and 227
BATCH = 8                    # 5 steps per epoch
SEED = 3


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


def take(batches, count):
  out = [next(batches) for _ in range(count)]
  batches.close()
  return out


def test_describes_the_store(dataset):
  assert (dataset.num_train, dataset.num_eval) == (NUM_TRAIN, NUM_EVAL)
  assert dataset.num_classes == NUM_CLASSES
  assert dataset.steps_per_epoch(BATCH) == 5


def test_train_batches_follow_the_epoch_order_and_per_example_augmentation(
    store_dir, dataset):
  stats = store.Statistics.load(store_dir)
  batches = take(dataset.train_batches(batch_size=BATCH, seed=SEED), 7)
  for step, batch in enumerate(batches):   # steps 5 and 6 are epoch 1
    assert batch['image'].shape == (BATCH, SIZE, SIZE, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    epoch, position = divmod(step, 5)
    order = np.random.default_rng([SEED, epoch]).permutation(NUM_TRAIN)
    for n, index in enumerate(order[position * BATCH:(position + 1) * BATCH]):
      label, image = decoded(store_dir, 'train', index)
      rng = np.random.default_rng([SEED, epoch, index])
      expected = augment.train_example(image, stats.mean_image, SIZE,
                                       stats.eigval, stats.eigvec, rng, 0.1)
      assert batch['label'][n] == label == index % NUM_CLASSES
      np.testing.assert_array_equal(batch['image'][n], expected)


def test_train_batches_are_deterministic_for_a_seed(dataset):
  first = take(dataset.train_batches(batch_size=BATCH, seed=SEED), 2)
  second = take(dataset.train_batches(batch_size=BATCH, seed=SEED), 2)
  other = take(dataset.train_batches(batch_size=BATCH, seed=SEED + 1), 2)
  for a, b, c in zip(first, second, other):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    assert not np.array_equal(a['image'], c['image'])


def test_resuming_mid_epoch_reads_what_an_uninterrupted_run_reads(dataset):
  run = take(dataset.train_batches(batch_size=BATCH, seed=SEED), 10)
  resumed = take(dataset.train_batches(batch_size=BATCH, seed=SEED,
                                       start_step=7), 3)
  for k, batch in zip((7, 8, 9), resumed):   # epoch 1, positions 2 to 4
    np.testing.assert_array_equal(batch['image'], run[k]['image'])
    np.testing.assert_array_equal(batch['label'], run[k]['label'])


def test_two_processes_rows_make_the_global_batch(dataset):
  whole = take(dataset.train_batches(batch_size=BATCH, seed=SEED,
                                     start_step=3), 3)
  parts = [take(dataset.train_batches(batch_size=BATCH, seed=SEED,
                                      start_step=3, rows=rows), 3)
           for rows in ((0, 4), (4, 8))]
  for k, batch in enumerate(whole):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key])
  eval_whole = list(dataset.eval_batches(batch_size=BATCH))
  eval_parts = [list(dataset.eval_batches(batch_size=BATCH, rows=rows))
                for rows in ((0, 4), (4, 8))]
  for k, batch in enumerate(eval_whole):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(
          np.concatenate([eval_parts[0][k][key], eval_parts[1][k][key]]),
          batch[key])


def test_worker_processes_do_not_change_the_batches(store_dir, dataset):
  parallel = imagenet.PreparedDataset(store_dir, SIZE, workers=2,
                                      processes=2)
  expected = take(dataset.train_batches(batch_size=BATCH, seed=SEED,
                                        start_step=4), 3)
  got = take(parallel.train_batches(batch_size=BATCH, seed=SEED,
                                    start_step=4), 3)
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # 3 evaluation batches over 2 processes: one makes two, the other one.
  expected = list(dataset.eval_batches(batch_size=5))
  got = list(parallel.eval_batches(batch_size=5))
  assert len(got) == 3
  for a, b in zip(expected, got):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(a[key], b[key])


def test_eval_batches_cover_every_example_once(store_dir, dataset):
  # 12 examples in batches of 5: the third batch holds 2 and 3 padded rows.
  stats = store.Statistics.load(store_dir)
  batches = list(dataset.eval_batches(batch_size=5))
  assert len(batches) == 3
  for batch in batches:
    assert batch['image'].shape == (5, SIZE, SIZE, 3)
    assert batch['image'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [1.0] * NUM_EVAL + [0.0] * 3)
  images = np.concatenate([b['image'] for b in batches])[:NUM_EVAL]
  labels = np.concatenate([b['label'] for b in batches])[:NUM_EVAL]
  for index in range(NUM_EVAL):
    label, image = decoded(store_dir, 'validation', index)
    assert labels[index] == label
    np.testing.assert_array_equal(
        images[index],
        augment.center_crop(augment.subtract_mean(image, stats.mean_image),
                            SIZE))


def test_ten_crop_eval_batches(store_dir, dataset, monkeypatch):
  stats = store.Statistics.load(store_dir)
  ten = imagenet.PreparedDataset(store_dir, SIZE, ten_crop=True, workers=4)
  # Room for one batch only: one thread, nothing prefetched, same batches.
  monkeypatch.setattr(imagenet, 'IN_FLIGHT_BYTES', 1)
  batches = list(ten.eval_batches(batch_size=5))
  centre = list(dataset.eval_batches(batch_size=5))
  assert batches[0]['image'].shape == (5, 10, SIZE, SIZE, 3)
  for patches, single in zip(batches, centre):
    np.testing.assert_array_equal(patches['image'][:, 4], single['image'])
    np.testing.assert_array_equal(patches['label'], single['label'])
    np.testing.assert_array_equal(patches['mask'], single['mask'])
  _, image = decoded(store_dir, 'validation', 1)
  np.testing.assert_array_equal(
      batches[0]['image'][1],
      augment.ten_crop(augment.subtract_mean(image, stats.mean_image), SIZE))


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

  patches = np.concatenate([
      b['image'] for b in imagenet.PreparedDataset(
          store_dir, SIZE, ten_crop=True).eval_batches(batch_size=NUM_EVAL)])
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
