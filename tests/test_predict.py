"""Prediction: the command line on image files, and that an image gets the
very input the run's evaluation gives it (digits, and a prepared folder with
either normalisation)."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn import datasets as sk_datasets

from commands import command_env
from alexnet_jax import (data, device_augment, imagenet, models, predict,
                         prepare, runs, train)
from configs import default, one_weird_trick

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest input of the 'owt' network: the cheapest graph to compile.
IMAGE_SIZE = 63
TRAIN_STEPS = 90
NUM_FILES = 4        # validation digits written as files, in each rendering
DIGIT_NAMES = [str(d) for d in range(10)]


def _predict(*args):
  return subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.predict', *args], cwd=REPO_ROOT,
      env=command_env(), capture_output=True, text=True, timeout=300)


def _softmax(run, images):
  logits = run.model().apply({'params': run.params}, images, train=False)
  return np.asarray(jax.nn.softmax(logits, axis=-1))


def _validation_digits():
  """Digits' validation images as sklearn holds them (0..16) and labels."""
  digits = sk_datasets.load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  held_out = order[:data.Digits.num_eval_examples]
  return digits.images[held_out], digits.target[held_out]


def _grey_uint8(levels):
  return np.round(levels * 255 / 16).astype(np.uint8)


# --- Digits --------------------------------------------------------------


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
  """A quarter-width 'owt' network trained briefly on the digits: about 90%
  validation top-1, so most predictions of real digits are right."""
  config = one_weird_trick.get_config('digits')
  config.parallelism = 'none'
  config.optimizer.batch_scaling = 'none'
  config.image_size = IMAGE_SIZE
  # Four epochs: without dropout they get much further.
  config.model.dropout_rate = 0.0
  config.num_train_steps = TRAIN_STEPS
  config.eval_every_steps = TRAIN_STEPS
  config.checkpoint_every_steps = TRAIN_STEPS
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  final = train.train_and_evaluate(config, workdir)
  return {'workdir': workdir, 'final': final}


@pytest.fixture(scope='module')
def digit_files(tmp_path_factory):
  """The first validation digits as PNGs: white on black (grey, 4x larger)
  and black on white (RGB), then things that are not images."""
  root = tmp_path_factory.mktemp('digit_files')
  levels, labels = _validation_digits()
  good = []
  for n in range(NUM_FILES):
    grey = _grey_uint8(levels[n])
    path = str(root / f'white_on_black_{n}.png')
    Image.fromarray(np.kron(grey, np.ones((4, 4), np.uint8))).save(path)
    good.append((path, labels[n]))
    path = str(root / f'black_on_white_{n}.png')
    Image.fromarray(np.repeat(255 - grey[..., None], 3, axis=-1)).save(path)
    good.append((path, labels[n]))
  text = root / 'notes.txt'
  text.write_text('not an image\n')
  (root / 'a_folder').mkdir()
  # What the command says of each: a missing path is not called "not an
  # image", it is missing.
  bad = {str(text): 'not an image (no format Pillow reads)',
         str(root / 'missing.png'): 'no such file',
         str(root / 'a_folder'): 'a directory, not an image file'}
  return good, bad


def _parse(stdout):
  """{path: [(name, percent), ...]} from the command's output."""
  blocks, path = {}, None
  for line in stdout.splitlines():
    if line.startswith('  '):
      rank, name, percent = line.split()
      assert rank == f'{len(blocks[path]) + 1}.'
      assert percent.endswith('%')
      blocks[path].append((name, float(percent[:-1])))
    else:
      path = line
      blocks[path] = []
  return blocks


def test_trained_run_is_good_enough_to_predict(digits_run):
  assert digits_run['final']['top1'] > 0.8


def test_command_line_classifies_the_images_and_reports_the_rest(
    digits_run, digit_files):
  good, bad = digit_files
  paths = [p for p, _ in good[:2]] + list(bad) + [p for p, _ in good[2:]]
  result = _predict(f'--workdir={digits_run["workdir"]}', *paths)
  assert result.returncode == 1, result.stderr
  error_lines = [line for line in result.stderr.splitlines()
                 if line.split(': ', 1)[0] in bad]
  assert len(error_lines) == len(bad), result.stderr
  for path, why in bad.items():
    assert f'{path}: {why}' in error_lines, result.stderr

  blocks = _parse(result.stdout)
  assert list(blocks) == [p for p, _ in good]   # in the order given
  right = 0
  for path, label in good:
    top = blocks[path]
    assert len(top) == 5
    assert len({name for name, _ in top}) == 5
    assert all(name in DIGIT_NAMES for name, _ in top)
    percents = [p for _, p in top]
    assert percents == sorted(percents, reverse=True)
    assert sum(percents) <= 100.05
    right += top[0][0] == str(label)
  assert right >= len(good) * 3 // 4
  # Both renderings of a digit are the same input once inverted.
  for n in range(NUM_FILES):
    assert blocks[good[2 * n][0]] == blocks[good[2 * n + 1][0]]


def test_top_k_and_a_good_file_alone_exit_zero(digits_run, digit_files):
  good, _ = digit_files
  result = _predict(f'--workdir={digits_run["workdir"]}', '--top_k=20',
                    good[0][0])
  assert result.returncode == 0, result.stderr
  (top,) = _parse(result.stdout).values()
  assert sorted(name for name, _ in top) == [str(d) for d in range(10)]
  assert abs(sum(p for _, p in top) - 100) < 0.1


def test_bad_workdir_is_an_error(tmp_path):
  result = _predict(f'--workdir={tmp_path}', 'image.png')
  assert result.returncode == 1
  assert result.stderr.startswith('error: ')
  assert 'config.json' in result.stderr


def test_images_of_validation_digits_get_the_evaluation_inputs(digits_run):
  p = predict.Predictor.from_workdir(digits_run['workdir'])
  assert p.class_names == [str(d) for d in range(10)]
  levels, labels = _validation_digits()
  count = 100
  grey = _grey_uint8(levels[:count])
  dataset = data.Digits(IMAGE_SIZE)
  expected = dataset._eval_examples(np.arange(count))
  assert (expected['label'] == labels[:count]).all()

  inputs = p.inputs([Image.fromarray(g) for g in grey])
  # Only the 17 grey levels' rounding to 8 bits differs.
  np.testing.assert_allclose(inputs, expected['image'], atol=4e-3)
  inverted_rgb = p.inputs([Image.fromarray(np.repeat(255 - g[..., None], 3, -1))
                           for g in grey])
  np.testing.assert_allclose(inverted_rgb, inputs, atol=1e-3)

  run = runs.restore(digits_run['workdir'])
  evaluation = _softmax(run, expected['image'])
  tops = p.classify_images(list(grey), top_k=3)
  assert len(tops) == count
  predicted = np.array([int(top[0][0]) for top in tops])
  agree = np.mean(predicted == evaluation.argmax(-1))
  assert agree >= 0.97
  # The softmax of the predictor's inputs is the evaluation's, up to them.
  np.testing.assert_allclose(p.probabilities(inputs), evaluation, atol=0.03)
  exact = p.probabilities(expected['image'])
  np.testing.assert_allclose(exact, evaluation, rtol=1e-4, atol=1e-6)


def test_classify_images_checks_its_input(digits_run):
  p = predict.Predictor.from_workdir(digits_run['workdir'], step=TRAIN_STEPS)
  assert p.step == TRAIN_STEPS
  with pytest.raises(ValueError, match='uint8'):
    p.classify_images([np.zeros((8, 8), np.float32)])
  with pytest.raises(ValueError, match='HxWx3'):
    p.classify_images([np.zeros((8, 8, 4), np.uint8)])
  assert p.classify_images([]) == []
  with pytest.raises(FileNotFoundError, match='No checkpoint 1 '):
    predict.Predictor.from_workdir(digits_run['workdir'], step=1)


# --- A prepared folder ----------------------------------------------------

CLASSES = ('blue', 'green', 'red')


def _picture(label, n, size):
  """A noisy image whose dominant colour is its class."""
  rng = np.random.default_rng([label, n])
  pixels = rng.integers(0, 120, (*size[::-1], 3))
  pixels[..., label] += 120
  return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope='module')
def folder_store(tmp_path_factory):
  """ROOT/train/<class> and ROOT/val/<class>: validation holds a JPEG, a grey
  PNG named .JPEG, a CMYK JPEG and a palette PNG."""
  root = tmp_path_factory.mktemp('folder')
  val_files = []
  for label, name in enumerate(CLASSES):
    train_dir = root / 'train' / name
    val_dir = root / 'val' / name
    train_dir.mkdir(parents=True)
    val_dir.mkdir(parents=True)
    for n in range(3):
      _picture(label, n, (80 + 10 * n, 60)).save(train_dir / f'{n}.jpg')
    picture = _picture(label, 10, (70, 90))
    renderings = {'rgb.jpg': picture, 'grey.JPEG': picture.convert('L'),
                  'cmyk.jpg': picture.convert('CMYK'),
                  'palette.png': picture.convert('P')}
    for file_name, image in renderings.items():
      format_ = 'PNG' if file_name in ('grey.JPEG', 'palette.png') else 'JPEG'
      image.save(val_dir / file_name, format_)
    # The validation split's order: classes, then sorted paths.
    val_files += sorted(str(val_dir / f) for f in renderings)
  out = str(root / 'store')
  prepare.prepare('folder', out, source=str(root), workers=1)
  return {'root': str(root), 'out': out, 'val_files': val_files}


def _folder_config(store_dir, normalization):
  config = default.get_config()
  config.model.variant = 'owt'
  config.model.width = 0.25
  config.model.num_classes = len(CLASSES)
  config.image_size = IMAGE_SIZE
  config.dataset = 'folder'
  config.store_dir = store_dir
  config.input.normalization = normalization
  return config


def paper_params(config, seed):
  """The paper's initialisation (section 5) drawn with NumPy, which needs no
  compilation: N(0, 0.01) kernels, biases of 1 in conv2/4/5 and fc6/7."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == 'kernel':
      return rng.normal(0.0, 0.01, leaf.shape).astype(np.float32)
    bias = 1.0 if path[0].key in models.PAPER_BIAS_ONE else 0.0
    return np.full(leaf.shape, bias, np.float32)

  return jax.tree_util.tree_map_with_path(
      draw, runs.abstract_state(config)['params'])


@pytest.fixture(scope='module')
def folder_runs(folder_store, tmp_path_factory):
  """Step-0 runs of the same random parameters, one per normalisation (the
  checkpoint does not depend on it: the second is a copy with its own
  config)."""
  workdirs = {}
  for normalization in ('mean_image', 'imagenet_mean_std'):
    workdirs[normalization] = str(tmp_path_factory.mktemp(normalization))
  config = _folder_config(folder_store['out'], 'mean_image')
  runs.write(workdirs['mean_image'], config, paper_params(config, 1))
  shutil.copytree(workdirs['mean_image'], workdirs['imagenet_mean_std'],
                  dirs_exist_ok=True)
  runs.write_config(workdirs['imagenet_mean_std'], _folder_config(
      folder_store['out'], 'imagenet_mean_std'))
  return workdirs


@pytest.mark.parametrize('normalization', ['mean_image', 'imagenet_mean_std'])
def test_a_file_gets_the_input_of_its_prepared_record(
    folder_store, folder_runs, normalization):
  p = predict.Predictor.from_workdir(folder_runs[normalization])
  assert p.class_names == list(CLASSES)
  files = folder_store['val_files']
  dataset = imagenet.PreparedDataset(
      folder_store['out'], IMAGE_SIZE, normalization=normalization)
  assert dataset.num_eval == len(files)
  expected = dataset._eval_examples(np.arange(len(files)))
  # The stored images, as the accelerator makes them into network inputs.
  expected['image'] = device_augment.network_inputs(
      expected, dataset.preprocessing, train=False)
  inputs = p.inputs([predict.read_image(path) for path in files])
  np.testing.assert_array_equal(inputs, expected['image'])

  results = p.classify_files(files, top_k=3)
  evaluation = _softmax(runs.restore(folder_runs[normalization]),
                        expected['image'])
  for result, probabilities in zip(results, evaluation):
    assert result.error is None
    assert [name for name, _ in result.top] == [
        CLASSES[i] for i in np.argsort(-probabilities, kind='stable')]
    np.testing.assert_allclose([q for _, q in result.top],
                               np.sort(probabilities)[::-1], rtol=1e-5)


def test_mean_image_needs_the_store(folder_runs, folder_store):
  with pytest.raises(predict.PredictError, match='--store_dir'):
    predict.Predictor.from_workdir(folder_runs['mean_image'],
                                   store_dir='/nonexistent/store')
  # torchvision's normalisation needs none; the names fall back to numbers.
  p = predict.Predictor.from_workdir(folder_runs['imagenet_mean_std'],
                                     store_dir='/nonexistent/store')
  assert p.class_names == ['class 0', 'class 1', 'class 2']
  (result,) = p.classify_files(folder_store['val_files'][:1])
  assert result.error is None and len(result.top) == 3


def test_class_names_and_unusable_datasets():
  imagenet_names = predict.class_names(default.get_config())
  assert len(imagenet_names) == 1000
  assert imagenet_names[0].startswith('tench')
  with pytest.raises(predict.PredictError, match='synthetic'):
    predict.make_inputs(default.get_config('synthetic'))
