"""A run's directory read back: its config and its parameters, wherever and
on however many devices it was written."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from commands import command_env
from alexnet_jax import runs, train
from configs import default, two_gpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def two_device_run(tmp_path_factory):
  """A two-column run checkpointed from two devices."""
  workdir = str(tmp_path_factory.mktemp('two_column'))
  config = two_gpu.get_config('synthetic')
  config.image_size = 67
  config.num_train_steps = 1
  train.train_and_evaluate(config, workdir)
  return workdir


def test_a_two_device_checkpoint_restores_in_a_one_device_process(
    two_device_run, tmp_path):
  here = runs.restore(two_device_run)
  assert here.step == 1
  out = tmp_path / 'params.npz'
  script = (
      'import jax, numpy as np; from alexnet_jax import runs; '
      f'run = runs.restore({two_device_run!r}); '
      'assert len(jax.devices()) == 1; '
      f'np.savez({str(out)!r}, **{{"/".join(k.key for k in path): v for '
      'path, v in jax.tree_util.tree_flatten_with_path(run.params)[0]})')
  env = command_env(JAX_NUM_CPU_DEVICES='1')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  there = np.load(out)
  flat = jax.tree_util.tree_flatten_with_path(here.params)[0]
  assert sorted(there.files) == sorted(
      '/'.join(k.key for k in path) for path, _ in flat)
  for path, value in flat:
    assert isinstance(value, np.ndarray)
    np.testing.assert_array_equal(there['/'.join(k.key for k in path)],
                                  value)


def test_a_config_from_before_a_field_existed_gets_its_default(tmp_path):
  saved = default.get_config('synthetic').to_dict()
  del saved['model']['lrn_across_columns']
  saved['model']['width'] = 0.5
  saved['mesh_shape'] = [4, 2]  # as JSON writes a tuple
  with open(tmp_path / runs.CONFIG_FILE, 'w') as f:
    json.dump(saved, f)
  config = runs.load_config(str(tmp_path))
  assert config.model.lrn_across_columns is False
  assert config.model.width == 0.5
  assert config.mesh_shape == (4, 2)
  assert config.dataset == 'synthetic'


def test_a_directory_that_is_not_a_run_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    runs.restore(str(tmp_path))
  assert os.listdir(tmp_path) == []
