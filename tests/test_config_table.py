"""Every config field, given a wrong type or an impossible value, is refused
before anything is compiled, by a message that names it.

The fields are enumerated by walking `configs/default.py`'s ConfigDict, so a
field added there is checked for wrong types without touching this file; its
impossible values must be added to IMPOSSIBLE (or the field to
NOTHING_IMPOSSIBLE, with the reason), or
`test_every_field_has_impossible_values_or_a_reason` fails.
"""

import os
import re
import subprocess
import sys

import jax
import ml_collections
import pytest

from commands import command_env
from alexnet_jax import train, validation
from configs import default

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fields(config, prefix=''):
  """(dotted name, declared type) of every leaf of `config`, recursively."""
  for key in sorted(config.keys()):
    value = config[key]
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, name + '.')
    elif value is None:
      # An optional field (store_dir): its reference carries the type.
      yield name, config.get_ref(key).get_type()
    else:
      yield name, type(value)


FIELDS = dict(_fields(default.get_config()))

# Values of the wrong type for a field declared with the key's type. An int is
# a valid float (--config.model.width=1 parses as one), so it is not listed for
# float fields; bool is a subclass of int but never a valid count or size.
WRONG_TYPES = {
    bool: ('yes', None),
    int: ('abc', 2.5, True, None),
    float: ('abc', True, None),
    str: (123, None),
    tuple: ('abc', 4, ('a', 'b'), None),
}

# Values of the right type that no run can use, per field.
IMPOSSIBLE = {
    'model.variant': ('vgg',),
    'model.num_classes': (0, -1),
    'model.dropout_rate': (1.0, -0.1),
    'model.dtype': ('float16',),
    'model.width': (0.0, -0.5),
    'model.lrn': ('maybe',),
    'model.lrn_n': (0, 4),
    'model.lrn_k': (-1.0,),
    'model.lrn_alpha': (-1e-4,),
    'model.lrn_beta': (-0.75,),
    'model.pool_window': (0,),
    'model.pool_stride': (0,),
    'model.init_scheme': ('xavier',),
    'model.activation': ('sigmoid',),
    'model.conv1': ('winograd',),
    'model.grouped_conv': ('depthwise',),
    'model.pooling': ('average',),
    'input.normalization': ('per_pixel',),
    # 'head' needs init_from: a new classifier on nothing trained.
    'trainable': ('conv', 'head'),
    'init_from': ('',),
    'store_dir': ('',),
    'dataset': ('cifar10',),
    'input.lighting_sigma': (-0.1,),
    'input.workers': (0, -2),
    'input.processes': (-1,),
    # Smaller than the smallest input of the 'original' network (67).
    'image_size': (0, -2, 40),
    'synthetic.num_train': (0, -3),
    'synthetic.num_eval': (0, -3),
    'batch_size': (0, -8),
    'eval_batch_size': (0,),
    'num_epochs': (0,),
    'num_train_steps': (0, -2),
    # The data order is np.random.default_rng([seed, epoch]), which refuses
    # negative entries: the first batch of any real dataset would fail.
    'seed': (-1,),
    'optimizer.learning_rate': (0.0, -0.01),
    'optimizer.momentum': (1.0, -0.1),
    'optimizer.weight_decay': (-1e-4,),
    'optimizer.momentum_convention': ('nesterov',),
    'optimizer.schedule': ('cosine',),
    'optimizer.plateau_factor': (0.0, 1.0),
    'optimizer.plateau_patience': (0,),
    'optimizer.plateau_threshold': (-1e-3,),
    'optimizer.max_drops': (-1,),
    'optimizer.step_epochs': (0,),
    'optimizer.batch_scaling': ('cube',),
    'optimizer.reference_batch_size': (0,),
    'parallelism': ('pipeline',),
    # (data, model): two entries, each positive or one -1 to fill in.
    'mesh_shape': ((0, 1), (-1, -1), (1, 2, 1), (-2, 1), (2.5, 1)),
    'num_devices': (0, -2),
    'cpu_devices': (0,),
    'log_every_steps': (0,),
    'eval_every_steps': (0, -2),
    'checkpoint_every_steps': (0,),
    'max_checkpoints_to_keep': (0,),
}

# Fields whose every value of the right type is usable (or checked elsewhere).
NOTHING_IMPOSSIBLE = {
    'ten_crop_eval': 'a bool',
    'optimizer.decay_biases': 'a bool',
    # True is refused only with parallelism='two_column' (test_validation).
    'model.lrn_across_columns': 'a bool',
}


def _wrong_type_cases():
  cases = []
  for field, kind in FIELDS.items():
    default_value = _get(default.get_config(), field)
    for value in WRONG_TYPES[kind]:
      if value is None and default_value is None:
        continue  # None is the optional field's "not given"
      cases.append(pytest.param(field, value, id=f'{field}={value!r}'))
  return cases


def _impossible_cases():
  return [pytest.param(field, value, id=f'{field}={value!r}')
          for field, values in IMPOSSIBLE.items() for value in values]


def _get(config, field):
  for part in field.split('.'):
    config = config[part]
  return config


def _config_with(field, value):
  """The synthetic smoke-test config with `field` set to `value`, whatever
  its type: built from a plain dict, because a ConfigDict refuses to change a
  field's type even when unlocked."""
  tree = default.get_config('synthetic').to_dict()
  node = tree
  *parents, leaf = field.split('.')
  for part in parents:
    node = node[part]
  node[leaf] = value
  return ml_collections.ConfigDict(tree)


def _no_compiling(*args, **kwargs):
  raise AssertionError('compiled before the config was checked')


def _assert_refused(field, value, tmp_path, monkeypatch):
  """check_config, or else train_and_evaluate before compiling, raises a
  ConfigError that names `config.<field>` and the value."""
  config = _config_with(field, value)
  try:
    validation.check_config(config)
  except validation.ConfigError as e:
    message = str(e)
  else:
    # Checks that need the devices or the dataset may come later, but never
    # after a compilation.
    monkeypatch.setattr(jax, 'jit', _no_compiling)
    monkeypatch.setattr(jax, 'eval_shape', _no_compiling)
    with pytest.raises(validation.ConfigError) as info:
      train.train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
  # Not a longer name that starts with this one (model.lrn vs model.lrn_n).
  assert re.search(rf'config\.{re.escape(field)}(?![\w.])', message), message
  assert str(value) in message, message


def test_the_walk_finds_nested_and_optional_fields():
  for field, kind in (('model.width', float), ('model.num_classes', int),
                      ('optimizer.momentum', float), ('input.workers', int),
                      ('synthetic.num_train', int), ('store_dir', str),
                      ('mesh_shape', tuple), ('ten_crop_eval', bool),
                      ('dataset', str)):
    assert FIELDS[field] is kind
  # No ConfigDict is left as a leaf.
  assert all(kind in WRONG_TYPES for kind in FIELDS.values()), FIELDS


def test_every_field_has_impossible_values_or_a_reason():
  assert not set(IMPOSSIBLE) & set(NOTHING_IMPOSSIBLE)
  assert set(FIELDS) == set(IMPOSSIBLE) | set(NOTHING_IMPOSSIBLE), (
      set(FIELDS) ^ (set(IMPOSSIBLE) | set(NOTHING_IMPOSSIBLE)))


def test_the_unchanged_config_passes():
  # Otherwise every refusal below could come from the base config.
  validation.check_config(_config_with('seed', 0))


@pytest.mark.parametrize('field, value', _wrong_type_cases())
def test_wrong_type_is_refused(field, value, tmp_path, monkeypatch):
  _assert_refused(field, value, tmp_path, monkeypatch)


@pytest.mark.parametrize('field, value', _impossible_cases())
def test_impossible_value_is_refused(field, value, tmp_path, monkeypatch):
  _assert_refused(field, value, tmp_path, monkeypatch)


@pytest.mark.parametrize('flag, field', [
    # ml_collections parses a float field's value itself.
    ('--config.model.width=abc', 'config.model.width'),
    # A tuple field takes any comma-separated text: ('abc',).
    ('--config.mesh_shape=abc', 'config.mesh_shape'),
], ids=['width', 'mesh_shape'])
def test_command_line_refuses_wrong_type(flag, field, tmp_path):
  workdir = tmp_path / 'work'
  env = command_env()
  result = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.main',
       '--config=configs/one_gpu.py:synthetic', f'--workdir={workdir}',
       '--config.num_train_steps=1', flag],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0, result.stdout
  assert field in result.stderr, result.stderr[-3000:]
  # A message, not a crash deep in the code.
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert not (workdir / 'checkpoints').exists()
