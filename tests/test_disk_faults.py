"""A full or unwritable disk stops a run with an error that names the path and
the cause, promptly, and leaves the previous checkpoint as it was, so that a
later run on a working disk resumes from it.

Root ignores permission bits, so the faults are made in ways that work for
any user: the kernel's own errors where a process can cause them to itself (a
file size limit, /dev/full), and otherwise the OSError that the failing call
raises, injected where orbax makes that call. The command-line runs are
subprocesses, so that a fault that leaves orbax's writer threads waiting shows
as a timeout here instead of stalling the test process on exit.
"""

import builtins
import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys

import pytest
from orbax.checkpoint._src.path import async_path

from commands import command_env
from alexnet_jax import checkpointing, metrics_io, train
from configs import one_gpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 67       # the smallest input: the quickest steps
STEPS = 8             # 4 per epoch: evaluations (and saves) at 4 and 8
EVERY = 2             # a save at 6 too, between the two evaluations
# A run here takes well under a minute; orbax's writer threads that wait for a
# directory that was never made give up only after 300 s.
CLI_TIMEOUT = 150
# Larger than every file a run writes except the checkpoint's arrays.
FILE_SIZE_LIMIT = 1 << 20

# Runs the command line with a fault set up first (`python -c`).
_RUN_MAIN = """
from absl import app
from alexnet_jax import main
app.run(main.main)
"""

_FILE_SIZE_LIMIT_PRELUDE = f"""
import resource, signal
# EFBIG from write() instead of death by SIGXFSZ, as on a full quota.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE,
                   ({FILE_SIZE_LIMIT}, resource.RLIM_INFINITY))
"""

_UNWRITABLE_CHECKPOINTS_PRELUDE = """
import errno, os
from orbax.checkpoint._src.path import async_path
_mkdir = async_path.mkdir
async def _unwritable(path, *args, **kwargs):
  # What mkdir raises in a directory the user may not write to.
  if '.orbax-checkpoint-tmp' in str(path):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
  return await _mkdir(path, *args, **kwargs)
async_path.mkdir = _unwritable
"""

_FULL_DISK_METRICS_PRELUDE = """
import builtins, os
from alexnet_jax import metrics_io
def _open(file, mode='r', *args, **kwargs):
  # Writes to /dev/full fail with the kernel's ENOSPC, as on a full disk.
  if 'a' in mode and os.path.basename(str(file)) == 'metrics.jsonl':
    return builtins.open('/dev/full', mode, *args, **kwargs)
  return builtins.open(file, mode, *args, **kwargs)
metrics_io.open = _open
"""


def _config(steps):
  config = one_gpu.get_config('synthetic')
  config.image_size = IMAGE_SIZE
  config.num_train_steps = steps
  config.checkpoint_every_steps = EVERY
  # The previous checkpoint is the only one: losing it loses the run.
  config.max_checkpoints_to_keep = 1
  return config


def _flags(workdir, steps):
  return ['--config=configs/one_gpu.py:synthetic', f'--workdir={workdir}',
          f'--config.image_size={IMAGE_SIZE}',
          f'--config.num_train_steps={steps}',
          f'--config.checkpoint_every_steps={EVERY}',
          '--config.max_checkpoints_to_keep=1']


def _run_cli(prelude, workdir, steps):
  """The command line with `prelude` run first; TimeoutExpired if it hangs."""
  return subprocess.run(
      [sys.executable, '-c', prelude + _RUN_MAIN, *_flags(workdir, steps)],
      cwd=REPO_ROOT, env=command_env(), capture_output=True, text=True,
      timeout=CLI_TIMEOUT)


def _error_line(result) -> str:
  """The one line that main prints for an error it explains; a crash has
  none, only a traceback."""
  lines = [line for line in result.stderr.splitlines()
           if line.startswith('error: ')]
  assert result.returncode == 1, (result.returncode, result.stderr[-4000:])
  assert len(lines) == 1, result.stderr[-4000:]
  return lines[0]


def _digest(directory) -> dict[str, str]:
  """Every file under `directory` and a hash of its bytes."""
  digest = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        digest[os.path.relpath(path, directory)] = hashlib.sha256(
            f.read()).hexdigest()
  assert digest, f'no files under {directory}'
  return digest


def _finished_steps(workdir) -> list[int]:
  # Unfinished saves leave *.orbax-checkpoint-tmp directories, which the next
  # run removes; only plain step numbers are checkpoints.
  return sorted(int(name) for name in
                os.listdir(os.path.join(workdir, 'checkpoints'))
                if name.isdigit())


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir trained for one epoch: its only checkpoint is step 4."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(_config(4), workdir)
  assert _finished_steps(workdir) == [4]
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = str(tmp_path / 'work')
  shutil.copytree(trained, copy)
  return copy


def _resumes_from_step_4(workdir, caplog):
  with caplog.at_level(logging.INFO):
    final = train.train_and_evaluate(_config(STEPS), workdir)
  messages = [r.getMessage() for r in caplog.records]
  assert 'Resuming at step 4' in messages, messages[-40:]
  assert final['step'] == STEPS
  assert _finished_steps(workdir) == [STEPS]
  train_steps = [r['step'] for r in metrics_io.read_metrics(workdir)
                 if r['split'] == 'train']
  assert train_steps == list(range(1, STEPS + 1))


# The failed write ends the event loop of orbax's background save while
# tensorstore's own threads are still finishing that save's array writes;
# as each finishes, tensorstore hands its result to the closed loop, which
# raises RuntimeError('Event loop is closed') in that thread, where nothing
# can catch it. The checkpoint on disk is what the test checks; the ignored
# exceptions are expected here and nowhere else.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_disk_full_in_a_background_checkpoint_write(workdir, monkeypatch,
                                                    caplog):
  # Orbax writes a checkpoint's metadata files from its background threads;
  # the error reaches the training loop only at a later save or wait.
  checkpoints = os.path.join(workdir, 'checkpoints')
  before = _digest(os.path.join(checkpoints, '4'))
  injected = []
  write_text = async_path.write_text

  async def full_disk(path, text):
    if '.orbax-checkpoint-tmp' in str(path):
      injected.append(str(path))
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await write_text(path, text)

  monkeypatch.setattr(async_path, 'write_text', full_disk)
  with pytest.raises(checkpointing.CheckpointError) as error:
    train.train_and_evaluate(_config(STEPS), workdir)
  assert injected, 'the fault was never injected'
  message = str(error.value)
  assert checkpoints in message, message
  assert 'No space left on device' in message, message
  assert _finished_steps(workdir) == [4]
  assert _digest(os.path.join(checkpoints, '4')) == before

  monkeypatch.setattr(async_path, 'write_text', write_text)
  _resumes_from_step_4(workdir, caplog)


def test_file_size_limit_on_the_checkpoint_arrays(workdir):
  # The kernel refuses tensorstore's writes of the arrays (EFBIG): a real
  # write error from orbax's C++ writer, as a full disk gives (ENOSPC).
  checkpoints = os.path.join(workdir, 'checkpoints')
  before = _digest(os.path.join(checkpoints, '4'))
  result = _run_cli(_FILE_SIZE_LIMIT_PRELUDE, workdir, STEPS)
  line = _error_line(result)
  assert checkpoints in line, line
  assert 'File too large' in line, line
  assert _finished_steps(workdir) == [4]
  assert _digest(os.path.join(checkpoints, '4')) == before


def test_unwritable_checkpoint_directory(workdir):
  checkpoints = os.path.join(workdir, 'checkpoints')
  before = _digest(os.path.join(checkpoints, '4'))
  result = _run_cli(_UNWRITABLE_CHECKPOINTS_PRELUDE, workdir, STEPS)
  line = _error_line(result)
  assert checkpoints in line, line
  assert 'Permission denied' in line, line
  assert _finished_steps(workdir) == [4]
  assert _digest(os.path.join(checkpoints, '4')) == before


@pytest.mark.parametrize('fail_mode', ['a', 'w'],
                         ids=['append', 'rewrite_at_start'])
def test_disk_full_writing_metrics(fail_mode, workdir, monkeypatch, caplog):
  # 'a': a record appended during training; 'w': the rewrite of
  # metrics.jsonl (through metrics.jsonl.tmp) that every start does.
  checkpoints = os.path.join(workdir, 'checkpoints')
  before = _digest(os.path.join(checkpoints, '4'))
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  injected = []

  def full_disk_open(file, mode='r', *args, **kwargs):
    if (mode.startswith(fail_mode)
        and os.path.basename(str(file)).startswith('metrics.jsonl')):
      injected.append(file)
      return builtins.open('/dev/full', mode, *args, **kwargs)
    return builtins.open(file, mode, *args, **kwargs)

  monkeypatch.setattr(metrics_io, 'open', full_disk_open, raising=False)
  with pytest.raises(OSError) as error:
    train.train_and_evaluate(_config(STEPS), workdir)
  assert injected, 'the fault was never injected'
  message = str(error.value)
  assert metrics_path in message, message
  assert 'No space left on device' in message, message
  assert _finished_steps(workdir) == [4]
  assert _digest(os.path.join(checkpoints, '4')) == before

  monkeypatch.setattr(metrics_io, 'open', builtins.open, raising=False)
  _resumes_from_step_4(workdir, caplog)


def test_disk_full_writing_metrics_from_the_command_line(workdir):
  result = _run_cli(_FULL_DISK_METRICS_PRELUDE, workdir, STEPS)
  line = _error_line(result)
  assert os.path.join(workdir, 'metrics.jsonl') in line, line
  assert 'No space left on device' in line, line
  assert _finished_steps(workdir) == [4]


def test_checkpoints_path_that_is_not_a_directory(tmp_path):
  # A workdir where the checkpoints cannot go, from the first step on.
  workdir = str(tmp_path / 'work')
  os.makedirs(workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  with open(checkpoints, 'w') as f:
    f.write('not a directory')
  result = _run_cli('', workdir, 2)
  line = _error_line(result)
  assert checkpoints in line, line
  assert 'Not a directory' in line or 'File exists' in line, line


def test_partly_written_metrics_record_does_not_block_resuming(workdir,
                                                               caplog):
  # A disk that fills up part-way through an append (or a kill mid-write)
  # leaves half a line at the end of metrics.jsonl.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 5, "epoch": 1.25, "split": "tr')
  _resumes_from_step_4(workdir, caplog)
