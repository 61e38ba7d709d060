"""Where metrics go: `workdir/metrics.jsonl`, TensorBoard events, the terminal.

Only process 0 writes. metrics.jsonl has one JSON object per logged event with
at least step, epoch, split ('train' or 'eval'), loss, top1, top5 and lr. When a
run resumes from step s, records after s (written before the interruption, and
about to be written again) are dropped, so the file reads like one run.
"""

from __future__ import annotations

import json
import logging as logging_lib
import math
import os
import sys

import jax
import numpy as np
from absl import logging


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for n, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if n < len(lines) - 1:
        raise
      # Half a record: the disk filled up, or the process was killed, while
      # it was appended. A resumed run writes that step again.
      logging.warning('Dropping the partly written last line of %s.', path)
  return records


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  Where PyTorch is installed (Colab, the test environment), tensorboardX
  imports it at once, only to accept its tensors: 1.5 s and about 150 MB more
  for every run, which writes Python floats. Unless something has already
  imported torch, it is hidden for the length of the import, and importable
  again after it.
  """
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if 'torch' in sys.modules and sys.modules['torch'] is None:
      del sys.modules['torch']
  return SummaryWriter


class MetricWriter:

  def __init__(self, workdir: str, *, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not self.enabled:
      return
    kept = [r for r in read_metrics(workdir) if r['step'] <= resume_step]
    tmp = self.path + '.tmp'
    try:
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
      os.replace(tmp, self.path)
    except OSError as e:
      raise _write_error(e, tmp) from e
    try:
      summary_writer = _summary_writer_class()
    except ImportError:  # TensorBoard output is optional; metrics.jsonl is not.
      logging.warning('tensorboardX is not installed: no TensorBoard events.')
    else:
      self._tb = summary_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, record: dict):
    if not self.enabled:
      return
    record = {k: _plain(v) for k, v in record.items()}
    try:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    except OSError as e:
      raise _write_error(e, self.path) from e
    if self._tb is not None:
      for key, value in record.items():
        if key not in ('step', 'split') and isinstance(value, (int, float)):
          self._tb.add_scalar(f"{record['split']}/{key}", value, record['step'])
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _write_error(e: OSError, path: str) -> OSError:
  # A failed flush on close (a full disk) raises without the file's name.
  return OSError(e.errno, f'Cannot write {path}: {e.strerror or e}')


def _plain(value):
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN; keep the record readable.
  return value


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


class _OwnLogsAndWarnings:
  """Lets through this package's log lines and everyone's warnings: the
  libraries' INFO chatter (orbax logs every file it writes, TFDS every
  stage) would bury the progress lines."""

  def filter(self, record):
    return record.levelno >= logging_lib.WARNING or (
        'alexnet_jax' in record.pathname)


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_OwnLogsAndWarnings())
