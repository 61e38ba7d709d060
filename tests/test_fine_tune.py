"""configs/fine_tune.py: a new head on a converted-like run's features, by
the command line, on a prepared folder of three classes."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import overrides as overrides_lib
from commands import command_env
from alexnet_jax import metrics_io, models, prepare, runs, train, validation
from configs import default, fine_tune
from test_predict import paper_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('checks', 'dots', 'stripes')
PER_CLASS = 8
# The smallest input of the 'owt' network: the cheapest graph to compile.
IMAGE_SIZE = 63
WIDTH = 0.25
TRAIN_STEPS = 4
FEATURE_LAYERS = models.CONV_LAYERS + models.FC_LAYERS[:2]


def _run(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO_ROOT,
                        env=command_env(), capture_output=True, text=True,
                        timeout=300)


def _picture(label, n):
  """A pattern and a colour per class, in noise, at a few sizes."""
  rng = np.random.default_rng([label, n])
  height, width = 64 + 8 * (n % 3), 64 + 8 * (n % 2)
  rows, cols = np.mgrid[:height, :width]
  pattern = [(rows // 8 + cols // 8) % 2 == 0,
             (rows % 8 < 3) & (cols % 8 < 3),
             rows % 8 < 4][label]
  pixels = rng.integers(0, 60, (height, width, 3))
  pixels[pattern, label] += 180
  return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  for label, name in enumerate(CLASSES):
    (root / name).mkdir()
    for n in range(PER_CLASS):
      _picture(label, n).save(root / name / f'{n}.jpg')
  out = str(tmp_path_factory.mktemp('store'))
  # Two of each class's eight for validation.
  prepare.prepare('folder', out, source=str(root), val_fraction=0.25,
                  workers=1)
  return {'root': str(root), 'store': out}


def _source_config(width=WIDTH):
  """What `convert` writes: the 'owt' network with torchvision's
  normalisation and ImageNet's 1000 classes."""
  config = default.get_config()
  config.model.variant = 'owt'
  config.model.width = width
  config.image_size = IMAGE_SIZE
  config.input.normalization = 'imagenet_mean_std'
  return config


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('converted'))
  config = _source_config()
  runs.write(workdir, config, paper_params(config, 0))
  return workdir


def _flags(init_from, store_dir, workdir, *extra):
  return ['--config=configs/fine_tune.py', f'--config.init_from={init_from}',
          f'--config.store_dir={store_dir}', '--config.model.num_classes=3',
          f'--config.model.width={WIDTH}', f'--config.image_size={IMAGE_SIZE}',
          '--config.batch_size=6', '--config.eval_batch_size=6',
          f'--config.num_train_steps={TRAIN_STEPS}', f'--workdir={workdir}',
          *extra]


@pytest.fixture(scope='module')
def head_run(folder, source, tmp_path_factory):
  """The fine-tuning command, from a copy of the source that the resume test
  takes away."""
  own_source = str(tmp_path_factory.mktemp('own_source') / 'run')
  shutil.copytree(source, own_source)
  workdir = str(tmp_path_factory.mktemp('fine_tuned'))
  flags = _flags(own_source, folder['store'], workdir)
  result = _run('alexnet_jax.main', *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  return {'workdir': workdir, 'flags': flags, 'source': own_source,
          'run': runs.restore(workdir), 'output': result}


def _config(store_dir, init_from, **fields):
  """The command's config, for in-process runs on one of the 8 devices."""
  config = fine_tune.get_config()
  config.init_from = init_from
  config.store_dir = store_dir
  config.model.num_classes = 3
  config.model.width = WIDTH
  config.image_size = IMAGE_SIZE
  config.batch_size = config.eval_batch_size = 6
  config.num_train_steps = TRAIN_STEPS
  config.num_devices = 1
  return overrides_lib.set_fields(config, fields)


def test_config_is_head_only_from_a_checkpoint():
  config = fine_tune.get_config()
  assert (config.model.variant, config.dataset, config.input.normalization,
          config.trainable, config.parallelism) == (
              'owt', 'folder', 'imagenet_mean_std', 'head', 'data')
  with pytest.raises(validation.ConfigError, match='init_from'):
    validation.check_config(config)
  with pytest.raises(ValueError, match='takes no argument'):
    fine_tune.get_config('digits')


def test_the_number_of_classes_error_is_the_guide(folder, source, tmp_path):
  config = _config(folder['store'], source)
  config.model.num_classes = fine_tune.get_config().model.num_classes
  with pytest.raises(validation.ConfigError,
                     match='--config.model.num_classes=3'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_only_the_head_learns(head_run, source):
  tuned, start = head_run['run'], runs.restore(source)
  assert tuned.step == TRAIN_STEPS
  for layer in FEATURE_LAYERS:
    for name, value in start.params[layer].items():
      np.testing.assert_array_equal(tuned.params[layer][name], value,
                                    err_msg=f'{layer}/{name}')
  config = tuned.config
  assert tuned.params['fc8']['kernel'].shape[-1] == 3
  fresh = jax.jit(lambda: tuned.model().init(
      jax.random.key(config.seed),
      jax.numpy.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False))()
  for name, value in fresh['params']['fc8'].items():
    assert np.abs(tuned.params['fc8'][name] - value).max() > 1e-5, name
  assert 'Starting from the parameters of' in head_run['output'].stderr


def test_metrics_have_train_and_eval_records(head_run):
  records = metrics_io.read_metrics(head_run['workdir'])
  splits = {r['split'] for r in records}
  assert splits == {'train', 'eval'}
  assert max(r['step'] for r in records if r['split'] == 'eval') == TRAIN_STEPS


def test_trainable_all_changes_every_layer(folder, source, tmp_path):
  workdir = str(tmp_path / 'all')
  train.train_and_evaluate(_config(folder['store'], source, trainable='all'),
                           workdir)
  tuned, start = runs.restore(workdir), runs.restore(source)
  for layer in FEATURE_LAYERS:
    for name, value in start.params[layer].items():
      assert not np.array_equal(tuned.params[layer][name], value), (
          f'{layer}/{name}')


@pytest.mark.parametrize('field, value, message', [
    # A model field that the source was trained with, named with both values.
    ('model.width', 0.5, 'width=0.25.*width=0.5'),
    ('model.activation', 'tanh', "activation='relu'.*activation='tanh'"),
    ('model.lrn', 'on', 'use_lrn=None.*use_lrn=True'),
    # Another input size: fc6 sees another number of inputs.
    ('image_size', IMAGE_SIZE + 32, 'layer fc6'),
])
def test_a_source_of_another_network_fails_before_training(
    folder, source, tmp_path, field, value, message):
  workdir = str(tmp_path / 'other')
  with pytest.raises(validation.ConfigError, match=message):
    train.train_and_evaluate(
        _config(folder['store'], source, **{field: value}), workdir)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '0'))
  assert metrics_io.read_metrics(workdir) == []


def test_a_missing_source_is_a_clear_error(folder, tmp_path):
  missing = str(tmp_path / 'no_such_run')
  with pytest.raises(FileNotFoundError,
                     match=r"config.init_from='.*no_such_run' is not a run"):
    train.train_and_evaluate(_config(folder['store'], missing),
                             str(tmp_path / 'run'))


def test_predict_names_the_folders_classes(head_run, folder):
  image = os.path.join(folder['root'], CLASSES[0], '0.jpg')
  result = _run('alexnet_jax.predict', f'--workdir={head_run["workdir"]}',
                image)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == image
  # Three classes: the top 5 are all of them.
  assert sorted(line.split()[1] for line in lines[1:]) == list(CLASSES)


def test_the_same_command_resumes_its_own_run(head_run):
  """Run last: it trains the fine-tuned run further, with its source gone."""
  shutil.rmtree(head_run['source'])
  flags = [f for f in head_run['flags'] if '--config.num_train_steps' not in f]
  result = _run('alexnet_jax.main', *flags,
                f'--config.num_train_steps={TRAIN_STEPS + 2}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resuming at step {TRAIN_STEPS}' in result.stderr
  assert 'Starting from the parameters of' not in result.stderr
  resumed = runs.restore(head_run['workdir'])
  assert resumed.step == TRAIN_STEPS + 2
  for layer in FEATURE_LAYERS:
    for name, value in head_run['run'].params[layer].items():
      np.testing.assert_array_equal(resumed.params[layer][name], value)
