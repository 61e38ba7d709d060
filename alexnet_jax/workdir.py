"""One run per workdir: the lock a training run holds on its directory.

Two runs training in one workdir would interleave their metrics.jsonl records
and write checkpoints over each other, and both would exit 0. So a run owns its
workdir from its start to its exit, and a second run stops at once, naming the
owner.

The lock is `WORKDIR/lock`, taken by process 0 for the whole run (the run owns
the workdir, not each of its processes). Two mechanisms, because workdirs live
on local disks and on shared filesystems alike:

- an exclusive `flock` on the open file, which the kernel drops however the
  owner ends, SIGKILL and power loss included (on NFS the server drops it when
  the dead client's lease runs out), so a killed run never locks its workdir
  for good and the same command resumes at once;
- a record in the file, the owner's host, pid, start and a heartbeat time
  rewritten every HEARTBEAT_SECONDS, which names the owner in the error. It
  also covers the filesystems where a flock is not seen by other hosts, or not
  supported at all: a record whose owner is alive on this host holds the
  workdir, and so does one from another host whose heartbeat goes on. A
  heartbeat younger than STALE_SECONDS that does not move is watched until it
  goes stale (a job requeued onto another node right after its run was
  killed takes over within a minute instead of failing). The heartbeat needs
  the hosts' clocks to agree to well within STALE_SECONDS, as NTP keeps a
  cluster's.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = 'lock'
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0
RECORD_BYTES = 1024


class WorkdirBusyError(RuntimeError):
  """Another run is training in this workdir."""


def _process_start(pid: int) -> str | None:
  """The start time of `pid` (in clock ticks since boot), which tells a live
  owner from an unrelated process that was given its pid later."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      # The command name (field 2) may hold spaces; it ends at the last ')'.
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive_here(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: it exists
  return start is None or _process_start(pid) in (None, start)


def _holds(record: dict | None) -> bool:
  """Whether the run `record` describes still owns the workdir."""
  if not record or record.get('released'):
    return False
  if record.get('host') == socket.gethostname():
    return _alive_here(int(record['pid']), record.get('pid_start'))
  return time.time() - float(record.get('heartbeat', 0)) < STALE_SECONDS


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # absent, or a record cut short by a crash: no owner


def _describe(record: dict | None, path: str) -> str:
  if not record:
    return f'another run holds the lock on {path}'
  age = time.time() - float(record.get('heartbeat', 0))
  return (f"process {record.get('pid')} on host {record.get('host')}, started "
          f"{record.get('started')} ({record.get('command')}; last heartbeat "
          f'{age:.0f} s ago)')


def busy_message(workdir: str, record: dict | None) -> str:
  path = os.path.join(workdir, LOCK_FILE)
  return (f'{workdir} is in use by another training run: '
          f'{_describe(record, path)}. Two runs in one workdir would mix '
          'their checkpoints and metrics, so this one stops without touching '
          'it. Wait for that run to end (or stop it: SIGTERM saves a '
          'checkpoint, and the same command then resumes), or give this run '
          'another --workdir. A run that died releases the lock at once on '
          f'its own host, and {STALE_SECONDS:.0f} s after its last heartbeat '
          'for another host; if it is certainly gone and the lock stays '
          f'(a filesystem that keeps a dead client\'s flock), delete {path}.')


def _watch(path: str, record: dict) -> dict | None:
  """`record` of an owner on another host, watched until it beats (the
  owner is alive), changes hands or goes stale: a heartbeat seen once may be
  the last of a run killed moments ago (a job requeued onto another node).
  Returns the record then."""
  while _holds(record):
    time.sleep(min(HEARTBEAT_SECONDS / 4, 1.0))
    now = _read(path)
    if now != record:
      return now
  return record


class _Lock:
  """Process 0's hold on a workdir: the flocked file and its heartbeat."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.fd = os.open(self.path,
                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      self._acquire(workdir)
    except BaseException:
      os.close(self.fd)
      raise

  def _try_flock(self) -> bool | None:
    """True if taken, False if another holds it, None if unsupported."""
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      return False
    except OSError as e:
      if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
        return None  # no flock on this filesystem: the record decides
      raise

  def _acquire(self, workdir: str):
    # A flock held while the record says its owner is gone is a dead NFS
    # client's, dropped when its lease runs out: waited for, this long.
    deadline = time.monotonic() + 2 * STALE_SECONDS
    while True:
      flocked = self._try_flock()
      record = _read(self.path)
      if _holds(record) and record.get('host') != socket.gethostname():
        record = _watch(self.path, record)
      if _holds(record) or (flocked is False
                            and time.monotonic() > deadline):
        raise WorkdirBusyError(busy_message(workdir, record))
      if flocked is not False:
        break
      time.sleep(1.0)
    pid = os.getpid()
    self.record = {
        'host': socket.gethostname(), 'pid': pid,
        'pid_start': _process_start(pid),
        'started': datetime.datetime.now().isoformat(timespec='seconds'),
        'command': ' '.join(sys.argv)[:400], 'heartbeat': time.time()}
    os.ftruncate(self.fd, RECORD_BYTES)  # whatever was longer before
    self._write()
    self._stop = threading.Event()
    self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                  name='workdir-heartbeat')
    self._beat.start()

  def _write(self):
    # One write of a fixed size, never a truncation: a reader sees the old
    # record or the new one, not an empty file in between.
    data = json.dumps(self.record).encode().ljust(RECORD_BYTES)
    os.pwrite(self.fd, data, 0)
    os.fsync(self.fd)

  def _heartbeat(self):
    while not self._stop.wait(HEARTBEAT_SECONDS):
      self.record['heartbeat'] = time.time()
      try:
        self._write()
      except OSError:
        pass  # a full disk: the checkpoint that fails next says so

  def release(self):
    self._stop.set()
    self._beat.join()
    # Marked released rather than deleted: deleting a flocked file lets two
    # later runs lock two different files of the same name.
    self.record['released'] = True
    try:
      self._write()
    finally:
      os.close(self.fd)  # drops the flock


@contextlib.contextmanager
def owned(workdir: str):
  """Holds `workdir` for one run; raises WorkdirBusyError if another run
  holds it. Every process of a multi-process run calls it; process 0 takes
  the lock and the others learn the outcome from it."""
  os.makedirs(workdir, exist_ok=True)
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = _Lock(workdir)
    except WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if busy and error is None:
      error = WorkdirBusyError(busy_message(
          workdir, _read(os.path.join(workdir, LOCK_FILE))))
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
