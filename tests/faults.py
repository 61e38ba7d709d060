"""Signal a training subprocess at a chosen moment, then run it again.

SIGKILL stands for a crash or a power loss, SIGTERM for a preemption. A moment
is a predicate on the workdir, which is all that a killed run leaves behind
(metrics.jsonl and `checkpoints/`), and on the run's log so far. Orbax writes a step to
`checkpoints/<step>.orbax-checkpoint-tmp-<timestamp>` and renames it to
`checkpoints/<step>` once complete, so "being written" and "written" can both
be seen from outside the process.

The workdir is polled every `POLL_SECONDS` while the run goes on; the first
time the moment holds, the whole process group is sent the signal, as Slurm
and Kubernetes signal every process of a job. A SIGKILL counts as landed only
if the process was still alive to receive it and the moment still holds once
it is dead: a checkpoint seen half-written may be renamed in the time it takes
the signal to arrive, and then the run was not killed mid-write at all. A
SIGTERM counts as landed if the process was alive to receive it; what the run
did with it is for the test to check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from typing import Callable, Sequence

POLL_SECONDS = 0.002
# Generous: a run takes seconds alone, but the machine may be shared.
DEFAULT_TIMEOUT = 300.0
_TMP_SUFFIX = '.orbax-checkpoint-tmp'


@dataclasses.dataclass(frozen=True)
class Moment:
  """A named predicate on a workdir and, if `reads_log`, on the run's log
  (stderr) so far: `holds(workdir, log) -> bool`."""
  description: str
  holds: Callable[[str, str], bool]
  reads_log: bool = False

  def __str__(self):
    return self.description


def read_records(workdir: str) -> list[dict]:
  """The records of metrics.jsonl; a line still being appended is skipped."""
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return []
  records = []
  for line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      # Only the last line can be partial: the writer appends whole lines.
      break
  return records


def checkpoint_entries(workdir: str) -> list[str]:
  """Names in `workdir/checkpoints`, finished steps and temporaries alike."""
  try:
    return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  except FileNotFoundError:
    return []


def finished_steps(workdir: str) -> list[int]:
  return sorted(int(name) for name in checkpoint_entries(workdir)
                if name.isdigit())


def _has_record(workdir: str, step: int, split: str) -> bool:
  return any(r.get('step') == step and r.get('split') == split
             for r in read_records(workdir))


def after_train_record(step: int) -> Moment:
  return Moment(f'after the train record of step {step}',
                lambda w, log: _has_record(w, step, 'train'))


def after_eval_record(step: int) -> Moment:
  return Moment(f'after the eval record of step {step}',
                lambda w, log: _has_record(w, step, 'eval'))


def during_evaluation(step: int) -> Moment:
  # Logged before the evaluation starts; recorded when it ends.
  return Moment(f'during the evaluation of step {step}',
                lambda w, log: (_has_record(w, step, 'train')
                                and not _has_record(w, step, 'eval')))


def after_log(text: str, *, before_first_record: bool = True) -> Moment:
  """When the log has `text` and (by default) metrics.jsonl no record yet:
  a moment of the start-up, which leaves nothing else to see."""
  return Moment(
      f'after the log line {text!r}' + (', before the first record'
                                        if before_first_record else ''),
      lambda w, log: text in log and not (before_first_record
                                          and read_records(w)),
      reads_log=True)


def when_checkpoint_writing(step: int) -> Moment:
  pattern = re.compile(rf'{step}{re.escape(_TMP_SUFFIX)}')

  def holds(workdir, log):
    entries = checkpoint_entries(workdir)
    return (str(step) not in entries
            and any(pattern.match(name) for name in entries))

  return Moment(f'while checkpoint {step} is being written', holds)


def after_checkpoint(step: int) -> Moment:
  return Moment(f'after checkpoint {step} is complete',
                lambda w, log: str(step) in checkpoint_entries(w))


def before_first_checkpoint() -> Moment:
  # The first record is the earliest output that proves training started;
  # no checkpoint may have begun, not even as a temporary directory.
  return Moment(
      'after the first record, before any checkpoint',
      lambda w, log: bool(read_records(w)) and not checkpoint_entries(w))


def all_of(*moments: Moment) -> Moment:
  return Moment(' and '.join(m.description for m in moments),
                lambda w, log: all(m.holds(w, log) for m in moments),
                reads_log=any(m.reads_log for m in moments))


def _holds(moment: Moment, workdir: str, log_path: str | None) -> bool:
  try:
    log = ''
    if moment.reads_log and log_path is not None:
      with open(log_path) as f:
        log = f.read()
    return moment.holds(workdir, log)
  except OSError:
    # A directory listed a moment ago and renamed since, and the like: the
    # next poll sees the settled state.
    return False


@dataclasses.dataclass
class Result:
  """One subprocess run. `landed` is None for a run that was not killed."""
  command: list[str]
  returncode: int
  seconds: float
  stdout: str
  stderr: str
  moment: Moment | None = None
  landed: bool | None = None
  # `checkpoints/` as the killed process left it, before anything else ran.
  entries_after_kill: list[str] = dataclasses.field(default_factory=list)

  def tail(self, chars: int = 3000) -> str:
    return (f'{self.command}\nreturncode {self.returncode}\n'
            f'--- stdout\n{self.stdout[-chars:]}\n'
            f'--- stderr\n{self.stderr[-chars:]}')


class _Process:
  """A subprocess in its own process group, its output going to files."""

  def __init__(self, command, *, log_prefix, cwd, env):
    self.command = list(command)
    self._out_path = log_prefix + '.stdout'
    self._err_path = log_prefix + '.stderr'
    os.makedirs(os.path.dirname(os.path.abspath(log_prefix)), exist_ok=True)
    self.started = time.monotonic()
    with open(self._out_path, 'w') as out, open(self._err_path, 'w') as err:
      # Its own session, hence process group: SIGKILL goes to everything the
      # run started, and a signal meant for the test runner does not reach it.
      self.popen = subprocess.Popen(self.command, cwd=cwd, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)

  @property
  def log_path(self) -> str:
    return self._err_path

  def kill_group(self, sig: int = signal.SIGKILL):
    try:
      os.killpg(self.popen.pid, sig)
    except ProcessLookupError:
      pass

  def wait(self, timeout):
    try:
      self.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill_group()
      self.popen.wait(timeout=60)
      raise TimeoutError(f'{self.command} ran for more than {timeout:.0f} s; '
                         f'killed.\n{self.result().tail()}') from None

  def result(self, **kwargs) -> Result:
    with open(self._out_path) as out, open(self._err_path) as err:
      stdout, stderr = out.read(), err.read()
    return Result(command=self.command, returncode=self.popen.returncode,
                  seconds=time.monotonic() - self.started, stdout=stdout,
                  stderr=stderr, **kwargs)


def run_to_completion(command: Sequence[str], *, log_prefix: str,
                      cwd: str | None = None, env: dict | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> Result:
  """Runs `command` to its end; raises TimeoutError past `timeout` seconds."""
  process = _Process(command, log_prefix=log_prefix, cwd=cwd, env=env)
  process.wait(timeout)
  return process.result()


def run_and_kill(command: Sequence[str], workdir: str, moment: Moment, *,
                 log_prefix: str, cwd: str | None = None,
                 env: dict | None = None, timeout: float = DEFAULT_TIMEOUT,
                 sig: int = signal.SIGKILL) -> Result:
  """Runs `command` and sends its process group `sig` the first time
  `moment` holds, then waits for it to end.

  Returns the run's Result: `landed` says whether the signal hit the moment.
  A run that ends first is not an error here (landed is False); one that runs
  past `timeout` seconds without reaching it is killed and raises.
  """
  if _holds(moment, workdir, None):
    # A previous run's leftovers would fire the kill before this run did
    # anything: the test would be testing nothing.
    raise ValueError(f'{moment} already holds in {workdir} before the run '
                     f'starts: {checkpoint_entries(workdir)}')
  process = _Process(command, log_prefix=log_prefix, cwd=cwd, env=env)
  deadline = process.started + timeout
  sent = False
  try:
    while process.popen.poll() is None:
      if _holds(moment, workdir, process.log_path):
        process.kill_group(sig)
        sent = True
        break
      if time.monotonic() > deadline:
        break
      time.sleep(POLL_SECONDS)
    else:
      # It ended before the moment came.
      return process.result(moment=moment, landed=False,
                            entries_after_kill=checkpoint_entries(workdir))
    if not sent:
      process.kill_group()
      process.popen.wait(timeout=60)
      raise TimeoutError(f'{moment} did not happen within {timeout:.0f} s.\n'
                         f'{process.result().tail()}')
    # A preempted run finishes its step, and maybe an evaluation, first.
    process.wait(60 if sig == signal.SIGKILL else timeout)
  finally:
    if process.popen.poll() is None:
      process.kill_group()
      process.popen.wait(timeout=60)
  if sig == signal.SIGKILL:
    # Killed by this signal (an exit in the meantime has another return
    # code), and still at the moment now that nothing can change the workdir.
    landed = (process.popen.returncode == -signal.SIGKILL
              and _holds(moment, workdir, process.log_path))
  else:
    landed = sent
  return process.result(moment=moment, landed=landed,
                        entries_after_kill=checkpoint_entries(workdir))


def kill_and_resume(command: Sequence[str], workdir: str,
                    moments: Sequence[Moment], *, log_dir: str,
                    cwd: str | None = None, env: dict | None = None,
                    timeout: float = DEFAULT_TIMEOUT,
                    sig: int = signal.SIGKILL
                    ) -> tuple[list[Result], Result]:
  """Signals one run of `command` at each moment in turn, then runs it to
  the end. Returns the signalled runs' Results and the last run's."""
  killed = []
  for n, moment in enumerate(moments):
    killed.append(run_and_kill(
        command, workdir, moment, log_prefix=os.path.join(log_dir, f'kill{n}'),
        cwd=cwd, env=env, timeout=timeout, sig=sig))
  final = run_to_completion(command, log_prefix=os.path.join(log_dir, 'resume'),
                            cwd=cwd, env=env, timeout=timeout)
  return killed, final
