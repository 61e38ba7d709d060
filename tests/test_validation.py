"""Config checks: every bad field is named, with its value, before compiling."""

import os
import subprocess
import sys
import time

import jax
import pytest

import overrides as overrides_lib
from commands import REPO_ROOT, command_env
from alexnet_jax import data, parallel, train, validation
from configs import default, one_gpu, one_weird_trick, two_gpu


def _config(**overrides):
  """The synthetic smoke-test config with dotted-path overrides."""
  return overrides_lib.set_fields(default.get_config('synthetic'), overrides)


@pytest.mark.parametrize('module, arg', [
    (default, None), (default, 'digits'), (default, 'synthetic'),
    (one_gpu, None), (one_gpu, 'digits'), (one_gpu, 'synthetic'),
    (two_gpu, None), (two_gpu, 'digits'), (two_gpu, 'synthetic'),
    (one_weird_trick, None), (one_weird_trick, 'digits'),
    (one_weird_trick, 'synthetic'),
])
def test_shipped_configs_pass(module, arg):
  validation.check_config(module.get_config(arg))


# (test id, overrides, field that must be named, bad value that must appear)
BAD_CONFIGS = [
    ('variant', {'model.variant': 'vgg'}, 'model.variant', 'vgg'),
    ('dtype', {'model.dtype': 'float16'}, 'model.dtype', 'float16'),
    ('lrn_mode', {'model.lrn': 'maybe'}, 'model.lrn', 'maybe'),
    ('init_scheme', {'model.init_scheme': 'xavier'}, 'model.init_scheme',
     'xavier'),
    ('dataset', {'dataset': 'cifar10'}, 'dataset', 'cifar10'),
    ('parallelism', {'parallelism': 'pipeline'}, 'parallelism', 'pipeline'),
    ('schedule', {'optimizer.schedule': 'cosine'}, 'optimizer.schedule',
     'cosine'),
    ('momentum_convention', {'optimizer.momentum_convention': 'nesterov'},
     'optimizer.momentum_convention', 'nesterov'),
    ('batch_scaling', {'optimizer.batch_scaling': 'cube'},
     'optimizer.batch_scaling', 'cube'),
    ('num_classes_zero', {'model.num_classes': 0}, 'model.num_classes', '0'),
    ('batch_size_negative', {'batch_size': -8}, 'batch_size', '-8'),
    ('batch_size_zero', {'batch_size': 0}, 'batch_size', '0'),
    ('eval_batch_size_zero', {'eval_batch_size': 0}, 'eval_batch_size', '0'),
    ('num_epochs_zero', {'num_epochs': 0}, 'num_epochs', '0'),
    ('log_every_negative', {'log_every_steps': -5}, 'log_every_steps', '-5'),
    ('checkpoint_every_zero', {'checkpoint_every_steps': 0},
     'checkpoint_every_steps', '0'),
    ('max_checkpoints_zero', {'max_checkpoints_to_keep': 0},
     'max_checkpoints_to_keep', '0'),
    ('pool_window_zero', {'model.pool_window': 0}, 'model.pool_window', '0'),
    ('pool_stride_negative', {'model.pool_stride': -2}, 'model.pool_stride',
     '-2'),
    ('patience_zero', {'optimizer.plateau_patience': 0},
     'optimizer.plateau_patience', '0'),
    ('step_epochs_zero', {'optimizer.step_epochs': 0}, 'optimizer.step_epochs',
     '0'),
    ('reference_batch_zero', {'optimizer.reference_batch_size': 0},
     'optimizer.reference_batch_size', '0'),
    ('cpu_devices_zero', {'cpu_devices': 0}, 'cpu_devices', '0'),
    ('width_zero', {'model.width': 0.0}, 'model.width', '0.0'),
    ('width_negative', {'model.width': -0.25}, 'model.width', '-0.25'),
    ('lrn_alpha_negative', {'model.lrn_alpha': -1e-4}, 'model.lrn_alpha',
     '-0.0001'),
    ('lrn_beta_zero', {'model.lrn_beta': 0.0}, 'model.lrn_beta', '0.0'),
    ('lrn_k_negative', {'model.lrn_k': -2.0}, 'model.lrn_k', '-2.0'),
    ('learning_rate_zero', {'optimizer.learning_rate': 0.0},
     'optimizer.learning_rate', '0.0'),
    ('learning_rate_negative', {'optimizer.learning_rate': -0.01},
     'optimizer.learning_rate', '-0.01'),
    ('weight_decay_negative', {'optimizer.weight_decay': -5e-4},
     'optimizer.weight_decay', '-0.0005'),
    ('momentum_negative', {'optimizer.momentum': -0.9}, 'optimizer.momentum',
     '-0.9'),
    ('momentum_one', {'optimizer.momentum': 1.0}, 'optimizer.momentum', '1.0'),
    ('max_drops_negative', {'optimizer.max_drops': -1}, 'optimizer.max_drops',
     '-1'),
    ('plateau_factor_one', {'optimizer.plateau_factor': 1.0},
     'optimizer.plateau_factor', '1.0'),
    ('plateau_factor_zero', {'optimizer.plateau_factor': 0.0},
     'optimizer.plateau_factor', '0.0'),
    ('plateau_threshold_zero', {'optimizer.plateau_threshold': 0.0},
     'optimizer.plateau_threshold', '0.0'),
    ('dropout_one', {'model.dropout_rate': 1.0}, 'model.dropout_rate', '1.0'),
    ('dropout_negative', {'model.dropout_rate': -0.1}, 'model.dropout_rate',
     '-0.1'),
    ('lrn_n_even', {'model.lrn_n': 4}, 'model.lrn_n', '4'),
    ('lrn_n_zero', {'model.lrn_n': 0}, 'model.lrn_n', '0'),
    ('num_train_steps_zero', {'num_train_steps': 0}, 'num_train_steps', '0'),
    ('num_train_steps_negative', {'num_train_steps': -3}, 'num_train_steps',
     '-3'),
    ('eval_every_zero', {'eval_every_steps': 0}, 'eval_every_steps', '0'),
    ('image_size_zero', {'image_size': 0}, 'image_size', '0'),
    ('num_devices_zero', {'num_devices': 0}, 'num_devices', '0'),
    ('image_too_small_original', {'image_size': 40}, 'image_size', '40'),
    ('image_too_small_owt', {'image_size': 40, 'model.variant': 'owt'},
     'image_size', '40'),
    ('two_column_owt', {'parallelism': 'two_column', 'model.variant': 'owt'},
     'parallelism', 'two_column'),
    # 96 * 0.3 = 28.8 -> 29 conv1 kernels: not two equal columns.
    ('width_odd_columns', {'model.width': 0.3}, 'model.width', '0.3'),
    # 96 * 0.0625 = 6 conv1 kernels: two columns of 3, which 'two_column'
    # cannot split again into 4 equal parts.
    ('width_two_column_split', {'model.width': 0.0625,
                                'parallelism': 'two_column'},
     'model.width', '0.0625'),
]


@pytest.mark.parametrize('overrides, field, value',
                         [case[1:] for case in BAD_CONFIGS],
                         ids=[case[0] for case in BAD_CONFIGS])
def test_check_config_names_field_and_value(overrides, field, value):
  config = _config(**overrides)
  with pytest.raises(validation.ConfigError) as info:
    validation.check_config(config)
  message = str(info.value)
  assert f'config.{field}' in message
  assert value in message


def test_two_column_owt_also_names_the_variant():
  with pytest.raises(validation.ConfigError, match='config.model.variant'):
    validation.check_config(_config(parallelism='two_column',
                                    **{'model.variant': 'owt'}))


def test_lrn_across_columns_needs_both_columns_on_one_device():
  with pytest.raises(validation.ConfigError,
                     match='config.model.lrn_across_columns'):
    validation.check_config(_config(parallelism='two_column',
                                    **{'model.lrn_across_columns': True}))
  validation.check_config(_config(**{'model.lrn_across_columns': True}))


def test_quarter_width_splits_over_two_columns():
  # 24/64/96/96/64 kernels: four equal parts each.
  validation.check_config(_config(parallelism='two_column'))


# The smallest inputs, from conv1 = (s + 2p - 11) // 4 + 1 and three 3/2
# pools: pool5 >= 1 needs pool2 >= 3, pool1 >= 7, conv1 >= 15, so
# s + 2p >= 67 (p = 0 for 'original', 2 for 'owt').
@pytest.mark.parametrize('variant, smallest', [('original', 67), ('owt', 63)])
def test_smallest_image_size(variant, smallest):
  validation.check_config(_config(image_size=smallest,
                                  **{'model.variant': variant}))
  with pytest.raises(validation.ConfigError) as info:
    validation.check_config(_config(image_size=smallest - 1,
                                    **{'model.variant': variant}))
  assert f'config.image_size={smallest - 1}' in str(info.value)
  assert str(smallest) in str(info.value).split('smallest')[-1]


def test_default_image_size_is_the_variants():
  assert validation.image_size(_config(image_size=-1)) == 227
  assert validation.image_size(
      _config(image_size=-1, **{'model.variant': 'owt'})) == 224


def test_config_error_is_a_value_error():
  assert issubclass(validation.ConfigError, ValueError)


# --- Checks that need the mesh or the dataset ---------------------------------


def test_check_layout_batch_not_divisible():
  scheme = parallel.make_scheme('data', jax.devices()[:4])
  config = _config(batch_size=10, eval_batch_size=16, parallelism='data')
  with pytest.raises(validation.ConfigError) as info:
    validation.check_layout(config, scheme, 1)
  assert 'config.batch_size' in str(info.value)
  assert '10' in str(info.value)


def test_check_layout_eval_batch_not_divisible():
  scheme = parallel.make_scheme('data', jax.devices()[:4])
  config = _config(batch_size=16, eval_batch_size=6, parallelism='data')
  with pytest.raises(validation.ConfigError) as info:
    validation.check_layout(config, scheme, 1)
  assert 'config.eval_batch_size' in str(info.value)
  assert '6' in str(info.value)


def test_check_layout_fc_neurons_not_divisible():
  # Quarter width: 1024 fc6 neurons do not split over 3 devices.
  scheme = parallel.make_scheme('weird_trick', jax.devices()[:3])
  config = _config(batch_size=12, eval_batch_size=12,
                   parallelism='weird_trick')
  with pytest.raises(validation.ConfigError) as info:
    validation.check_layout(config, scheme, 1)
  assert 'config.model.width' in str(info.value)
  assert '1024' in str(info.value)


def test_check_layout_accepts_divisible_batches():
  scheme = parallel.make_scheme('data', jax.devices()[:4])
  validation.check_layout(_config(batch_size=16, eval_batch_size=16,
                                  parallelism='data'), scheme, 1)


def test_check_dataset_num_classes_mismatch():
  config = _config(**{'model.num_classes': 10})
  dataset = data.Synthetic(67, num_classes=7, num_train=64, num_eval=32)
  with pytest.raises(validation.ConfigError) as info:
    validation.check_dataset(config, dataset)
  assert 'config.model.num_classes' in str(info.value)
  assert '10' in str(info.value) and '7' in str(info.value)


def test_check_dataset_batch_larger_than_dataset():
  config = _config(batch_size=128)
  dataset = data.Synthetic(67, num_classes=10, num_train=64, num_eval=32)
  with pytest.raises(validation.ConfigError) as info:
    validation.check_dataset(config, dataset)
  assert 'config.batch_size' in str(info.value)
  assert '128' in str(info.value)


# --- End to end: train_and_evaluate fails before compiling --------------------


@pytest.mark.parametrize('overrides, field', [
    ({'model.lrn_n': 4}, 'config.model.lrn_n'),
    ({'model.width': 0.3}, 'config.model.width'),
    ({'image_size': 40}, 'config.image_size'),
    # Needs the mesh: 10 does not split over 4 devices.
    ({'parallelism': 'data', 'num_devices': 4, 'batch_size': 10},
     'config.batch_size'),
    # More devices than the 8 simulated ones.
    ({'parallelism': 'data', 'num_devices': 16}, 'config.num_devices'),
], ids=['lrn_n', 'width', 'image_size', 'layout', 'devices'])
def test_train_raises_before_compiling(overrides, field, tmp_path,
                                       monkeypatch):
  def no_compiling(*args, **kwargs):
    raise AssertionError('compiled before the config was checked')

  monkeypatch.setattr(jax, 'jit', no_compiling)
  monkeypatch.setattr(jax, 'eval_shape', no_compiling)
  config = _config(**{'image_size': 67, **overrides})
  start = time.perf_counter()
  with pytest.raises(validation.ConfigError, match=field):
    train.train_and_evaluate(config, str(tmp_path))
  assert time.perf_counter() - start < 5.0
  # Nothing was written either.
  assert os.listdir(tmp_path) == []


# --- Mistakes on the command line: a line that says what was wrong ----------

# (arguments after the command, what the one error line must say)
COMMAND_LINE_MISTAKES = {
    'unknown_config_argument': (
        ['--config=configs/two_gpu.py:digitz'],
        ["--config=configs/two_gpu.py:digitz: Unknown config argument "
         "'digitz'", "'digits'", "'synthetic'"]),
    'misspelt_section': (
        ['--config=configs/two_gpu.py:digits', '--config.modl.width=2'],
        ["--config.modl.width: the config has no field 'modl'",
         'Did you mean "model" instead of "modl"?']),
    'misspelt_field': (
        ['--config=configs/two_gpu.py:digits', '--config.model.widht=2'],
        ["--config.model.widht: the config has no field 'widht'",
         'Did you mean "width"']),
    'missing_config_file': (
        ['--config=configs/two_gpus.py'],
        ['--config=configs/two_gpus.py: cannot load it (No such file or '
         'directory)', 'configs/two_gpu.py']),
    'value_of_the_wrong_type': (
        ['--config=configs/two_gpu.py:digits', '--config.model.width=wide'],
        ['--config.model.width=wide', "could not convert string to float"]),
}


@pytest.mark.parametrize('name', list(COMMAND_LINE_MISTAKES))
def test_command_line_mistake_is_one_line(name, tmp_path):
  arguments, expected = COMMAND_LINE_MISTAKES[name]
  result = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.main', *arguments,
       f'--workdir={tmp_path}'], cwd=REPO_ROOT, env=command_env(),
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) <= 2, result.stderr
  assert lines[0].startswith('error: '), result.stderr
  for text in expected:
    assert text in lines[0], result.stderr
  assert not os.listdir(tmp_path)  # nothing started
