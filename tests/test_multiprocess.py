"""Two processes joined by jax.distributed train exactly like one process.

Each run is a real `python -m alexnet_jax.main`: two processes on loopback
with 2 CPU devices each (started by launch/local.sh), against one process with
4 devices. The global batch, the parameters and the dropout keys do not depend
on how many processes share the mesh, so the per-step training losses must
agree; a checkpoint written by the two processes must resume in one, and
SIGTERM must stop both at the same step.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from commands import command_env, start_two_processes
from alexnet_jax import metrics_io, runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch', 'local.sh')
# A run compiles for about half a minute on a small CPU; a hung coordinator
# or collective must fail the test, not stall it.
TIMEOUT_S = 240
STEPS = 4

WEIRD_TRICK = ('--config=configs/one_weird_trick.py:synthetic',)
TWO_COLUMN = ('--config=configs/two_gpu.py:synthetic',
              '--config.mesh_shape=(2,2)')


def _env():
  # launch/local.sh starts its processes with $PYTHON.
  return command_env(PYTHON=sys.executable)


def _run(command):
  """Runs `command` in its own session so a timeout kills every process."""
  proc = subprocess.Popen(command, cwd=REPO, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
  try:
    output, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate()
    pytest.fail(f'{command} ran past {TIMEOUT_S}s:\n{output[-5000:]}')
  assert proc.returncode == 0, (
      f'{command} exited with {proc.returncode}:\n{_errors(output)}'
      f'{output[-5000:]}')
  return output


def _errors(output):
  # The first exception is the cause; the tail often holds only its echoes.
  return ''.join(line + '\n' for line in output.splitlines()
                 if 'Error' in line)


def _flags(config, workdir, steps):
  return [*config, f'--workdir={workdir}', '--config.num_devices=4',
          f'--config.num_train_steps={steps}', '--config.log_every_steps=1']


def train_one_process(config, workdir, steps=STEPS):
  return _run([sys.executable, '-m', 'alexnet_jax.main',
               *_flags(config, workdir, steps)])


def train_two_processes(config, workdir, steps=STEPS):
  return _run(['bash', LAUNCH, '2', *_flags(config, workdir, steps)])


def train_losses(workdir):
  records = [r for r in metrics_io.read_metrics(str(workdir))
             if r['split'] == 'train']
  return [r['step'] for r in records], np.array([r['loss'] for r in records])


def assert_same_training(reference, other, steps=STEPS):
  """`other` logged steps 1..`steps`, with `reference`'s losses."""
  ref_steps, ref_losses = train_losses(reference)
  got_steps, got_losses = train_losses(other)
  # Exactly one record per step: a second writer (process 1) would duplicate
  # them.
  assert ref_steps == list(range(1, STEPS + 1))
  assert got_steps == list(range(1, steps + 1))
  np.testing.assert_allclose(got_losses, ref_losses[:steps], rtol=1e-5)


@pytest.fixture(scope='module')
def weird_trick_one_process(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('owt_1p')
  train_one_process(WEIRD_TRICK, workdir)
  return workdir


@pytest.fixture(scope='module')
def weird_trick_two_processes(tmp_path_factory):
  # One step short of the reference, so that resuming it has a step to take.
  workdir = tmp_path_factory.mktemp('owt_2p')
  output = train_two_processes(WEIRD_TRICK, workdir, steps=STEPS - 1)
  return workdir, output


def test_weird_trick_two_processes_match_one(weird_trick_one_process,
                                             weird_trick_two_processes):
  workdir, output = weird_trick_two_processes
  # Both processes really joined one 4-device mesh.
  assert '[0] ' in output and '[1] ' in output
  assert 'process 1 of 2' in output
  assert_same_training(weird_trick_one_process, workdir, steps=STEPS - 1)


def test_one_process_resumes_two_process_checkpoint(
    tmp_path, weird_trick_one_process, weird_trick_two_processes):
  two_process_dir, _ = weird_trick_two_processes
  workdir = tmp_path / 'resumed'
  shutil.copytree(two_process_dir, workdir)
  assert os.listdir(workdir / 'checkpoints') == [str(STEPS - 1)]
  output = train_one_process(WEIRD_TRICK, workdir)
  assert f'Resuming at step {STEPS - 1}' in output
  # Steps 1-3 were taken by two processes, step 4 by one from their
  # checkpoint: together they must be the uninterrupted one-process run.
  assert_same_training(weird_trick_one_process, workdir)


def test_two_column_two_processes_match_one(tmp_path):
  one = tmp_path / 'two_column_1p'
  two = tmp_path / 'two_column_2p'
  train_one_process(TWO_COLUMN, one)
  output = train_two_processes(TWO_COLUMN, two)
  assert "mesh {'data': 2, 'model': 2}" in output
  assert_same_training(one, two)


def test_sigterm_to_one_process_stops_both_and_resumes_exactly(
    tmp_path, weird_trick_two_processes):
  # Slurm or Kubernetes signal every process, but each sees the signal after
  # a different step; signalling one process only is the extreme case. A
  # process that saved alone would wait for the others forever. Signalled
  # while it compiles, the run stops after its first step, with a
  # checkpoint of it, and the same command then ends as the uninterrupted
  # two-process run did, bit for bit.
  reference, _ = weird_trick_two_processes
  workdir = tmp_path / 'preempted'
  flags = _flags(WEIRD_TRICK, workdir, steps=STEPS - 1)
  logs = [tmp_path / f'process_{i}.log' for i in range(2)]
  procs = start_two_processes(flags, logs, _env())
  try:
    deadline = time.time() + TIMEOUT_S
    while 'Compiling the train step' not in logs[0].read_text():
      assert all(p.poll() is None for p in procs), logs[0].read_text()
      assert time.time() < deadline, 'the run did not start in time'
      time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  outputs = [log.read_text() for log in logs]
  assert [p.returncode for p in procs] == [0, 0], _errors(outputs[0])
  stops = [re.findall(r'Preempted at step (\d+)', o) for o in outputs]
  assert stops[0] and stops[0] == stops[1], stops
  step = int(stops[0][0])
  assert step < STEPS - 1
  assert os.listdir(workdir / 'checkpoints') == [str(step)]

  output = train_two_processes(WEIRD_TRICK, workdir, steps=STEPS - 1)
  assert f'Resuming at step {step}' in output
  records = lambda w: [(r['step'], r['split'], r['loss'], r['top1'])
                       for r in metrics_io.read_metrics(str(w))]
  assert records(workdir) == records(reference)
  # The final parameters, read into this one process whatever the mesh.
  got, want = runs.restore(str(workdir)), runs.restore(str(reference))
  assert got.step == want.step == STEPS - 1
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got.params),
                               jax.tree_util.tree_leaves_with_path(want.params),
                               strict=True):
    assert np.array_equal(a, b), path
