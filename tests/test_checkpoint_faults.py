"""A truncated or corrupt checkpoint never crash-loops a run and never sends it
back to step 0 silently."""

import logging
import os

import pytest

from alexnet_jax import checkpointing, metrics_io, train
from configs import one_gpu


def _config(steps):
  config = one_gpu.get_config('synthetic')
  config.num_train_steps = steps
  config.checkpoint_every_steps = 2
  config.max_checkpoints_to_keep = 5
  return config


def _corrupt(step_dir):
  # Truncate every file of the saved train state to half its length.
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      with open(path, 'r+b') as f:
        f.truncate(size // 2)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path,
                                                              caplog):
  workdir = str(tmp_path)
  train.train_and_evaluate(_config(4), workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert sorted(int(s) for s in os.listdir(checkpoints)) == [2, 4]
  _corrupt(os.path.join(checkpoints, '4'))

  with caplog.at_level(logging.WARNING):
    final = train.train_and_evaluate(_config(6), workdir)
  warnings = ' '.join(r.getMessage() for r in caplog.records
                      if r.levelno >= logging.WARNING)
  assert 'Checkpoint 4' in warnings and 'cannot be restored' in warnings
  assert 'Resuming from step 2 instead of the unreadable checkpoint(s) 4' in (
      warnings)
  # The unreadable one is kept aside, and the run went on from step 2.
  assert os.listdir(checkpoints + '_unreadable') == ['4']
  assert final['step'] == 6
  steps = [r['step'] for r in metrics_io.read_metrics(workdir)
           if r['split'] == 'train']
  assert steps == sorted(set(steps)) and steps[-1] == 6
  assert 6 in [int(s) for s in os.listdir(checkpoints)]


def test_no_readable_checkpoint_is_an_error_not_a_restart(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(_config(4), workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  for step in os.listdir(checkpoints):
    _corrupt(os.path.join(checkpoints, step))
  with pytest.raises(checkpointing.CheckpointError) as error:
    train.train_and_evaluate(_config(6), workdir)
  assert 'None of the checkpoints [4, 2]' in str(error.value)
  # Nothing was overwritten or moved.
  assert sorted(os.listdir(checkpoints)) == ['2', '4']
