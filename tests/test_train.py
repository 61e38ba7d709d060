"""End-to-end training on tiny synthetic data: outputs, resume, a workdir's
owner and the runs it refuses (preemption is in test_kill_resume.py)."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import overrides as overrides_lib
from commands import command_env
from alexnet_jax import metrics_io, train, validation
from configs import one_gpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = {'step', 'epoch', 'split', 'loss', 'top1', 'top5', 'lr'}
# Smallest input of the 'original' network: the cheapest graph to compile.
IMAGE_SIZE = 67
# The synthetic config has 64 training examples in batches of 16.
STEPS_PER_EPOCH = 4


def _config(num_train_steps, **overrides):
  config = one_gpu.get_config('synthetic')
  config.image_size = IMAGE_SIZE
  config.num_train_steps = num_train_steps
  config.checkpoint_every_steps = 2
  return overrides_lib.set_fields(config, overrides)


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit())


def _checkpoint_entries(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _steps(records, split):
  return [r['step'] for r in records if r['split'] == split]


# --- In process --------------------------------------------------------------


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  """4 steps (one epoch): an evaluation at step 4, checkpoints every 2."""
  workdir = str(tmp_path_factory.mktemp('first_run'))
  final = train.train_and_evaluate(_config(4), workdir)
  return {'workdir': workdir, 'final': final,
          'records': metrics_io.read_metrics(workdir),
          'checkpoints': _checkpoint_entries(workdir)}


@pytest.fixture(scope='module')
def resumed_run(first_run):
  """The same workdir trained on to step 6."""
  workdir = first_run['workdir']
  final = train.train_and_evaluate(_config(6), workdir)
  return {'workdir': workdir, 'final': final,
          'records': metrics_io.read_metrics(workdir)}


def test_returns_final_metrics(first_run):
  final = first_run['final']
  assert final['step'] == 4
  assert final['epoch'] == pytest.approx(4 / STEPS_PER_EPOCH)
  assert math.isfinite(final['loss']) and final['loss'] > 0
  assert 0.0 <= final['top1'] <= final['top5'] <= 1.0
  assert 'preempted' not in final
  # The returned metrics are the last evaluation's record.
  last_eval = [r for r in first_run['records'] if r['split'] == 'eval'][-1]
  for key in ('step', 'loss', 'top1', 'top5'):
    assert final[key] == last_eval[key], key


def test_metrics_jsonl(first_run):
  records = first_run['records']
  assert records
  for record in records:
    assert METRIC_KEYS <= set(record), record
    assert record['split'] in ('train', 'eval')
    assert record['epoch'] == pytest.approx(record['step'] / STEPS_PER_EPOCH)
    assert record['lr'] == pytest.approx(0.01)
    for key in ('loss', 'top1', 'top5'):
      assert isinstance(record[key], float) and math.isfinite(record[key])
  # log_every_steps=1 in the synthetic config; evaluation once per epoch.
  assert _steps(records, 'train') == [1, 2, 3, 4]
  assert _steps(records, 'eval') == [4]
  # Each line is a JSON object on its own.
  with open(os.path.join(first_run['workdir'], 'metrics.jsonl')) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  assert [json.loads(line) for line in lines] == records


def test_tensorboard_events(first_run):
  directory = os.path.join(first_run['workdir'], 'tensorboard')
  events = [name for name in os.listdir(directory)
            if name.startswith('events.out.tfevents')]
  assert events
  assert all(os.path.getsize(os.path.join(directory, name)) > 0
             for name in events)


def test_tensorboard_events_without_importing_pytorch(tmp_path):
  # PyTorch is installed here, as on Colab; a run writes floats and must not
  # pay for importing it (tensorboardX would, at once).
  code = ('import sys; from alexnet_jax import metrics_io\n'
          f'w = metrics_io.MetricWriter({str(tmp_path)!r}, resume_step=0)\n'
          "w.write({'step': 1, 'split': 'train', 'loss': 2.5}); w.close()\n"
          "assert 'torch' not in sys.modules, 'imported torch'\n"
          'import torch  # still importable afterwards\n')
  done = subprocess.run([sys.executable, '-c', code], env=command_env(),
                        cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  (events,) = os.listdir(tmp_path / 'tensorboard')
  assert b'train/loss' in (tmp_path / 'tensorboard' / events).read_bytes()


def test_checkpoints_written(first_run):
  entries = first_run['checkpoints']
  # Due every 2 steps, and at the evaluation of step 4; none left half-written.
  assert entries == ['2', '4']


def test_resume_continues_from_last_step(first_run, resumed_run):
  records = resumed_run['records']
  assert _steps(records, 'train') == [1, 2, 3, 4, 5, 6]
  assert _steps(records, 'eval') == [4, 6]
  # Steps 1-4 are the first run's records, untouched (their throughput field
  # would differ had they been trained again).
  assert records[:len(first_run['records'])] == first_run['records']
  assert resumed_run['final']['step'] == 6
  assert _checkpoint_steps(resumed_run['workdir'])[-1] == 6


def test_finished_run_is_not_trained_again(resumed_run):
  before = metrics_io.read_metrics(resumed_run['workdir'])
  final = train.train_and_evaluate(_config(6), resumed_run['workdir'])
  assert final == resumed_run['final']
  assert metrics_io.read_metrics(resumed_run['workdir']) == before


def test_non_finite_loss_stops_before_saving(tmp_path):
  # A learning rate of 1e8 keeps step 1 finite (its loss is taken before the
  # first update) and makes step 2 diverge.
  workdir = str(tmp_path)
  config = _config(4, log_every_steps=1, checkpoint_every_steps=1,
                   **{'optimizer.learning_rate': 1e8})
  with pytest.raises(train.NonFiniteLossError) as info:
    train.train_and_evaluate(config, workdir)
  message = str(info.value)
  match = re.search(r'at step (\d+)', message)
  assert match, message
  bad_step = int(match.group(1))
  assert bad_step == 2
  records = metrics_io.read_metrics(workdir)
  assert _steps(records, 'train')[:1] == [1]
  assert math.isfinite(records[0]['loss'])
  # The checkpoint the message points to exists, complete, when the error
  # is raised, and nothing of the bad step or later was saved.
  entries = _checkpoint_entries(workdir)
  assert entries == ['1'], entries
  assert 'step 1' in message


# --- The command line, in subprocesses --------------------------------------

CLI_STEPS = 8  # two epochs; evaluated once, at the end


def _cli(workdir, checkpoint_every):
  return [sys.executable, '-m', 'alexnet_jax.main',
          '--config=configs/one_gpu.py:synthetic', f'--workdir={workdir}',
          f'--config.num_train_steps={CLI_STEPS}',
          f'--config.checkpoint_every_steps={checkpoint_every}',
          f'--config.eval_every_steps={CLI_STEPS}',
          f'--config.image_size={IMAGE_SIZE}']


def _run(args):
  return subprocess.run(args, cwd=REPO_ROOT, env=command_env(), capture_output=True,
                        text=True, timeout=300)


def _start(args):
  return subprocess.Popen(args, cwd=REPO_ROOT, env=command_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _wait_until(process, condition, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if condition():
      return True
    time.sleep(0.02)
  return False


def _error_lines(result):
  return [line for line in result.stderr.splitlines()
          if line.startswith('error:')]


def test_second_run_in_a_live_workdir_stops_at_once(tmp_path):
  # The same command twice in one workdir: the second must neither train nor
  # touch the first's metrics and checkpoints, and must say who owns it.
  workdir = str(tmp_path)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  long_run = _cli(workdir, 1000) + ['--config.num_train_steps=100000',
                                    '--config.eval_every_steps=100000']
  first = _start(long_run)
  try:
    assert _wait_until(first, lambda: os.path.exists(metrics)
                       and '"train"' in open(metrics).read())
    started = time.time()
    second = _run(long_run)
    seconds = time.time() - started
    assert first.poll() is None, 'the first run stopped'
    first.send_signal(signal.SIGTERM)
    _, first_stderr = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
      first.communicate()
  assert second.returncode == 1, second.stderr[-3000:]
  (error,) = _error_lines(second)
  assert f'process {first.pid} on host ' in error, error
  assert 'another --workdir' in error
  assert 'Traceback' not in second.stderr
  # It stopped before compiling anything.
  assert 'Compiling' not in second.stderr
  assert seconds < 60, seconds
  # The first run's record is its own: one record per step, in order.
  assert first.returncode == 0, first_stderr[-3000:]
  steps = _steps(metrics_io.read_metrics(workdir), 'train')
  assert steps == list(range(1, len(steps) + 1)), steps
  assert _checkpoint_entries(workdir) == [str(steps[-1])]


def test_workdir_of_another_network_is_refused_before_restoring(resumed_run,
                                                                tmp_path):
  # Resuming a workdir with a config of another network: one paragraph
  # naming the field and both values, and the checkpoints left as they were.
  workdir = str(tmp_path / 'copy')
  shutil.copytree(resumed_run['workdir'], workdir)
  before = _checkpoint_entries(workdir)
  result = _run(_cli(workdir, 2) + ['--config.model.width=0.5'])
  assert result.returncode == 1, result.stderr[-3000:]
  (error,) = _error_lines(result)
  assert 'config.model.width is 0.5 here, 0.25 there' in error, error
  assert 'a new --workdir' in error and 'parallelism' in error, error
  # A different network: its parameters are no start for this one.
  assert '--config.init_from' not in error, error
  assert 'Traceback' not in result.stderr and 'TensorStore' not in (
      result.stderr), result.stderr[-3000:]
  assert _checkpoint_entries(workdir) == before


def test_resume_refusals_and_what_may_change(resumed_run, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(resumed_run['workdir'], workdir)
  before = _checkpoint_entries(workdir)
  # The optimization changed, the network not: fine-tuning from it would do.
  with pytest.raises(validation.ConfigError) as error:
    train.train_and_evaluate(
        _config(8, **{'optimizer.learning_rate': 0.02, 'seed': 3}), workdir)
  message = str(error.value)
  assert 'config.optimizer.learning_rate is 0.02 here, 0.01 there' in message
  assert 'config.seed is 3 here, 0 there' in message
  assert f'--config.init_from={workdir}' in message
  # No config.json (a run of an older version): the checkpoint's shapes.
  os.remove(os.path.join(workdir, 'config.json'))
  with pytest.raises(validation.ConfigError) as error:
    train.train_and_evaluate(_config(8, **{'model.variant': 'owt'}), workdir)
  assert "in the checkpoint ['conv1']['kernel'] is (11, 11, 3, 24)" in str(
      error.value)
  assert _checkpoint_entries(workdir) == before
  # Another scheme on other devices, and a longer run: resumed.
  final = train.train_and_evaluate(
      _config(8, parallelism='data', num_devices=2), workdir)
  assert final['step'] == 8
  steps = _steps(metrics_io.read_metrics(workdir), 'train')
  assert steps == list(range(1, 9))


def test_cli_non_finite_loss(tmp_path):
  workdir = str(tmp_path)
  args = _cli(workdir, 1) + ['--config.optimizer.learning_rate=1e8',
                             '--config.log_every_steps=1']
  result = _run(args)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines()
            if line.startswith('error:')]
  assert len(errors) == 1 and 'at step 2' in errors[0], result.stderr[-3000:]
  # The checkpoint the message names survives the exit, complete.
  assert 'step 1' in errors[0]
  assert _checkpoint_entries(workdir) == ['1']
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
