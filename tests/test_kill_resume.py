"""A run SIGKILLed or SIGTERMed at any moment and started again ends as if
never stopped.

Each scenario signals the command-line trainer at chosen moments
(tests/faults.py watches the workdir and the log from outside), runs the same
command to the end, and compares it with one uninterrupted run: the final
line, every metrics.jsonl record bit for bit, and every array of the final
checkpoint. A SIGKILLed run leaves what it had written; a SIGTERMed one must
exit with status 0 after saving a checkpoint of the step it stopped at.

The runs log every 2 steps, checkpoint every 3 and evaluate (then checkpoint)
every 4, so checkpoints 3 and 9 hold one step of the metric window that the
next log line averages: a resumed run logs the same averages only if the
checkpoint carried it.
"""

from __future__ import annotations

import dataclasses
import math
from multiprocessing import pool as thread_pool
import os
import re
import signal
import sys
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from commands import command_env

import faults

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
LOG_EVERY, CHECKPOINT_EVERY, EVAL_EVERY = 2, 3, 4
# The smallest input of the 'original' network: the quickest to compile.
IMAGE_SIZE = 67
# Two runs at a time on a 2-core machine: most of a short run is Python
# start-up and compilation, and a slower run only makes the checkpoint-writing
# window (a few hundred ms) easier to hit.
PARALLEL_RUNS = 2
RUN_TIMEOUT = 300
# Every scenario runs three to six subprocesses, two scenarios at a time.
SCENARIO_TIMEOUT = 1800
# Written by every record; images_per_sec is a timing and differs by nature.
COMPARED_KEYS = ('step', 'split', 'epoch', 'loss', 'top1', 'top5', 'lr')


def _command(workdir):
  return [sys.executable, '-m', 'alexnet_jax.main',
          '--config=configs/one_gpu.py:synthetic', f'--workdir={workdir}',
          f'--config.num_train_steps={STEPS}',
          f'--config.log_every_steps={LOG_EVERY}',
          f'--config.checkpoint_every_steps={CHECKPOINT_EVERY}',
          f'--config.eval_every_steps={EVAL_EVERY}',
          f'--config.image_size={IMAGE_SIZE}']


def _final_line(result: faults.Result) -> str:
  lines = [line for line in result.stdout.splitlines()
           if line.startswith('final:')]
  assert len(lines) == 1, result.tail()
  return lines[0]


def _resumed_at(result: faults.Result) -> int | None:
  """The step a run resumed from (its log says so), None if it started anew."""
  found = re.findall(r'Resuming at step (\d+)', result.stderr)
  assert len(found) <= 1, result.tail()
  return int(found[0]) if found else None


def _exact(value):
  # Floats by their bits: == would equate 0.0 and -0.0, and fail on NaN.
  if isinstance(value, float):
    return value.hex()
  return value


def _records(workdir):
  return [tuple(_exact(r[k]) for k in COMPARED_KEYS)
          for r in faults.read_records(workdir)]


def _final_checkpoint(workdir):
  """The last checkpoint's state and schedule (arrays) and its JSON record."""
  steps = faults.finished_steps(workdir)
  assert steps, faults.checkpoint_entries(workdir)
  path = os.path.join(workdir, 'checkpoints', str(steps[-1]))
  # Restored as they were saved, with no target: the comparison sees every
  # array the checkpoint holds, whatever its structure.
  arrays_reader = ocp.StandardCheckpointer()
  json_reader = ocp.Checkpointer(ocp.JsonCheckpointHandler())
  try:
    arrays = {name: arrays_reader.restore(os.path.join(path, name))
              for name in ('state', 'schedule')}
    meta = json_reader.restore(os.path.join(path, 'meta'))
  finally:
    arrays_reader.close()
    json_reader.close()
  return steps[-1], arrays, meta


@dataclasses.dataclass(frozen=True)
class Scenario:
  moments: tuple[faults.Moment, ...]
  # For the run after each kill: the steps it may resume from (None: it
  # starts from scratch). What the kill left behind decides it.
  resumes_from: tuple[frozenset, ...]
  # For each kill: a check of `checkpoints/` as it left it.
  check_entries: tuple[Callable[[list[str]], None], ...]
  sig: int = signal.SIGKILL


def _no_checkpoint(entries):
  assert entries == [], entries


def _mid_write(step):
  def check(entries):
    assert str(step) not in entries, entries
    assert any(e.startswith(f'{step}.orbax-checkpoint-tmp') for e in entries), (
        entries)
  return check


def _complete_up_to(step):
  def check(entries):
    steps = [int(re.match(r'\d+', e).group()) for e in entries]
    assert steps and max(steps) == step, entries
    assert str(step) in entries, entries
  return check


def _none_past(step):
  def check(entries):
    assert all(int(re.match(r'\d+', e).group()) <= step for e in entries), (
        entries)
  return check


# Each scenario kills one workdir's runs one after another, so that a restart
# is itself killed where a fresh run would be: fewer runs, the same moments.
SCENARIOS = {
    # The first record is step 2's; the first checkpoint is step 3's: killed
    # before it, the restart starts afresh. Then checkpoint 9 is complete and
    # step 10 logged; checkpoint 9 carries step 9's metrics, which the log of
    # step 10 averages with step 10's.
    'before_first_checkpoint_then_between_checkpoints': Scenario(
        moments=(faults.before_first_checkpoint(),
                 faults.all_of(faults.after_checkpoint(9),
                               faults.after_train_record(10))),
        resumes_from=(frozenset({None}), frozenset({9})),
        check_entries=(_no_checkpoint, _complete_up_to(9))),
    # A periodic checkpoint half on disk: the restart ignores the temporary
    # directory, resumes from the evaluation's checkpoint and saves 6 again.
    # Then the evaluation of step 8 is in metrics.jsonl, and its checkpoint
    # only just started (saving takes a few hundred ms): the restart drops the
    # records after the checkpoint it resumes from and evaluates again. 8 is
    # allowed in case the save outran the kill on a loaded machine.
    'checkpoint_being_written_then_right_after_evaluation': Scenario(
        moments=(faults.when_checkpoint_writing(6),
                 faults.after_eval_record(8)),
        resumes_from=(frozenset({4}), frozenset({6, 8})),
        check_entries=(_mid_write(6), _none_past(8))),
    # Twice: during the first evaluation's checkpoint (the restart resumes
    # from checkpoint 3 and its metric window), then during the last one's,
    # after the final evaluation record was written.
    'twice_while_writing': Scenario(
        moments=(faults.when_checkpoint_writing(4),
                 faults.when_checkpoint_writing(12)),
        resumes_from=(frozenset({3}), frozenset({9})),
        check_entries=(_mid_write(4), _mid_write(12))),
}

# Preemptions, one after another in one workdir, at every kind of moment: the
# input pipeline's start of a fresh run, an evaluation (step 4, which saves
# it: the preemption must not save it again, as orbax refuses a step twice), a
# resumed run's first compilation, a checkpoint being written (9), and the
# evaluation of step 12, which is also due at the interval and the last.
# Each run finishes the step it is in (and its evaluation), saves that step
# once and exits 0; the next resumes from it. The step depends on how soon the
# signal arrives, hence the allowed sets.
_PREEMPTIONS = (
    (faults.after_log('Starting the input pipeline'), {1, 2}),
    (faults.during_evaluation(4), {4, 5}),
    (faults.after_log('Compiling the train step', before_first_record=False),
     {5, 6, 7}),
    (faults.when_checkpoint_writing(9), {9, 10, 11}),
    (faults.during_evaluation(12), {12}),
)
SCENARIOS['sigterm_at_every_kind_of_moment'] = Scenario(
    moments=tuple(m for m, _ in _PREEMPTIONS),
    resumes_from=tuple(frozenset(s) for _, s in _PREEMPTIONS),
    check_entries=tuple(_none_past(max(s)) for _, s in _PREEMPTIONS),
    sig=signal.SIGTERM)


def _reference(workdir, log_dir):
  return faults.run_to_completion(
      _command(workdir), log_prefix=os.path.join(log_dir, 'reference'),
      cwd=REPO_ROOT, env=command_env(), timeout=RUN_TIMEOUT)


def _scenario(scenario, workdir, log_dir):
  return faults.kill_and_resume(
      _command(workdir), workdir, scenario.moments, log_dir=log_dir,
      cwd=REPO_ROOT, env=command_env(), timeout=RUN_TIMEOUT, sig=scenario.sig)


@pytest.fixture(scope='module')
def launched(tmp_path_factory):
  """Starts the reference run and every scenario, two at a time.

  Returns {name: (workdir, AsyncResult)}; a test waits for its own, so one
  scenario's failure (its exception re-raised by .get()) fails only its test.
  """
  pool = thread_pool.ThreadPool(PARALLEL_RUNS)
  jobs = {}
  # The scenarios of most runs first, so that both threads finish together.
  runs = lambda name: len(SCENARIOS[name].moments) if name in SCENARIOS else 0
  for name in sorted(('reference', *SCENARIOS), key=runs, reverse=True):
    workdir = str(tmp_path_factory.mktemp(name))
    log_dir = str(tmp_path_factory.mktemp(f'{name}_logs'))
    if name == 'reference':
      job = pool.apply_async(_reference, (workdir, log_dir))
    else:
      job = pool.apply_async(_scenario, (SCENARIOS[name], workdir, log_dir))
    jobs[name] = (workdir, job)
  yield jobs
  pool.close()
  # Every run has its own timeout, so this ends.
  pool.join()


@pytest.fixture(scope='module')
def reference(launched):
  workdir, job = launched['reference']
  result = job.get(timeout=SCENARIO_TIMEOUT)
  assert result.returncode == 0, result.tail()
  step, arrays, meta = _final_checkpoint(workdir)
  return {'workdir': workdir, 'final_line': _final_line(result),
          'records': _records(workdir),
          'entries': faults.checkpoint_entries(workdir),
          'step': step, 'arrays': arrays, 'meta': meta}


def test_reference_run(reference):
  records = reference['records']
  steps = lambda split: [r[0] for r in records if r[1] == split]
  assert steps('train') == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
  assert steps('eval') == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
  assert reference['final_line'].startswith(f'final: step {STEPS} ')
  # Checkpoints at 3, 4, 6, 8, 9 and 12; the default keeps the last three.
  assert reference['entries'] == ['12', '8', '9']
  assert reference['step'] == STEPS
  assert int(reference['arrays']['state']['step']) == STEPS
  assert reference['meta']['eval']['step'] == STEPS
  # Something was learnt to compare: the losses are real numbers.
  assert all(math.isfinite(float.fromhex(r[3])) for r in records)


@pytest.mark.parametrize('name', list(SCENARIOS))
def test_killed_and_resumed_run_matches_uninterrupted(name, launched,
                                                      reference):
  scenario = SCENARIOS[name]
  workdir, job = launched[name]
  killed, final = job.get(timeout=SCENARIO_TIMEOUT)

  # Every kill landed at its moment, and left the workdir as that moment
  # implies; each following run resumed from where the kill left it.
  assert len(killed) == len(scenario.check_entries)
  for n, result in enumerate(killed):
    assert result.landed, (f'the kill {result.moment} did not land: '
                           f'{result.entries_after_kill}\n{result.tail()}')
    assert not any(line.startswith('final:')
                   for line in result.stdout.splitlines()), result.tail()
    scenario.check_entries[n](result.entries_after_kill)
    if scenario.sig == signal.SIGTERM:
      # A normal exit, whose last checkpoint is the step it stopped at.
      assert result.returncode == 0, result.tail()
      assert 'preempted: checkpoint saved' in result.stdout, result.tail()
      stops = re.findall(r'Preempted at step (\d+)', result.stderr)
      assert len(stops) == 1, result.tail()
      saved = [int(e) for e in result.entries_after_kill if e.isdigit()]
      assert saved and max(saved) == int(stops[0]), result.entries_after_kill
      resumed = (killed[1:] + [final])[n]
      assert _resumed_at(resumed) == int(stops[0]), resumed.tail()
  after_kills = [*killed[1:], final]
  for result, allowed in zip(after_kills, scenario.resumes_from, strict=True):
    assert _resumed_at(result) in allowed, result.tail()

  assert final.returncode == 0, final.tail()
  assert _final_line(final) == reference['final_line']
  assert _records(workdir) == reference['records']
  # The same checkpoints kept, and no half-written one left over; a
  # preemption saves a step of its own, which may keep an older one out.
  entries = faults.checkpoint_entries(workdir)
  if scenario.sig == signal.SIGKILL:
    assert entries == reference['entries']
  else:
    assert all(e.isdigit() for e in entries), entries
    assert len(entries) == len(reference['entries']) and str(STEPS) in entries

  step, arrays, meta = _final_checkpoint(workdir)
  assert step == reference['step']
  assert meta == reference['meta']
  for part in ('state', 'schedule'):
    expected = jax.tree_util.tree_leaves_with_path(reference['arrays'][part])
    actual = jax.tree_util.tree_leaves_with_path(arrays[part])
    assert [p for p, _ in actual] == [p for p, _ in expected], part
    for (path, want), (_, got) in zip(expected, actual):
      want, got = np.asarray(want), np.asarray(got)
      where = f'{part}{jax.tree_util.keystr(path)}'
      assert got.dtype == want.dtype and got.shape == want.shape, where
      assert np.array_equal(got, want), where


# --- The helper itself, on workdirs made by hand ------------------------------


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def test_moments_read_the_workdir(tmp_path):
  workdir = str(tmp_path)
  before = faults.before_first_checkpoint()
  assert not before.holds(workdir, '')
  # A record cut short by the kill is not a record yet.
  _write(os.path.join(workdir, 'metrics.jsonl'),
         '{"step": 2, "split": "train"}\n{"step": 4, "spl')
  assert before.holds(workdir, "")
  assert faults.after_train_record(2).holds(workdir, "")
  assert not faults.after_train_record(4).holds(workdir, "")
  assert not faults.after_eval_record(2).holds(workdir, "")

  os.makedirs(os.path.join(workdir, 'checkpoints', '3.orbax-checkpoint-tmp'))
  assert not before.holds(workdir, "")
  assert faults.when_checkpoint_writing(3).holds(workdir, "")
  # 33's temporary directory is not 3's.
  assert not faults.when_checkpoint_writing(33).holds(workdir, "")
  assert not faults.after_checkpoint(3).holds(workdir, "")
  os.rename(os.path.join(workdir, 'checkpoints', '3.orbax-checkpoint-tmp'),
            os.path.join(workdir, 'checkpoints', '3'))
  assert faults.after_checkpoint(3).holds(workdir, "")
  assert not faults.when_checkpoint_writing(3).holds(workdir, "")
  assert faults.all_of(faults.after_checkpoint(3),
                       faults.after_train_record(2)).holds(workdir, "")
  assert not faults.all_of(faults.after_checkpoint(3),
                           faults.after_eval_record(2)).holds(workdir, "")
  # Start-up moments read the log, up to the first record.
  compiling = faults.after_log('Compiling')
  assert compiling.reads_log
  assert not compiling.holds(workdir, 'I1201 Resuming at step 3')
  assert not compiling.holds(workdir, 'Compiling the train step')
  empty = str(tmp_path / 'empty')
  assert compiling.holds(empty, 'Compiling the train step')
  assert faults.during_evaluation(2).holds(workdir, '')
  assert not faults.during_evaluation(4).holds(workdir, '')


def test_run_and_kill_reports_whether_the_kill_landed(tmp_path):
  workdir = str(tmp_path / 'workdir')
  marker = faults.after_checkpoint(1)
  # Makes the moment come, then lives on until killed.
  waits = [sys.executable, '-c',
           'import os, time; os.makedirs("workdir/checkpoints/1"); '
           'time.sleep(120)']
  result = faults.run_and_kill(waits, workdir, marker,
                               log_prefix=str(tmp_path / 'waits'),
                               cwd=str(tmp_path), timeout=60)
  assert result.landed and result.returncode == -9, result.tail()
  assert result.seconds < 60

  # The moment already holds: refused rather than killing at once.
  with pytest.raises(ValueError, match='already holds'):
    faults.run_and_kill(waits, workdir, marker,
                        log_prefix=str(tmp_path / 'again'), cwd=str(tmp_path))

  # A run that ends before its moment is not reported as killed.
  ends = [sys.executable, '-c', 'print("done")']
  result = faults.run_and_kill(ends, workdir, faults.after_checkpoint(2),
                               log_prefix=str(tmp_path / 'ends'),
                               cwd=str(tmp_path), timeout=60)
  assert result.landed is False and result.returncode == 0
  assert result.stdout == 'done\n'

  # A moment that never comes, in a run that never ends: a timeout.
  sleeps = [sys.executable, '-c', 'import time; time.sleep(120)']
  with pytest.raises(TimeoutError):
    faults.run_and_kill(sleeps, workdir, faults.after_checkpoint(2),
                        log_prefix=str(tmp_path / 'sleeps'),
                        cwd=str(tmp_path), timeout=1)
