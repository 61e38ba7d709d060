"""One run per workdir: the lock, and how a dead owner's lock is told apart.

The command-line cases (a second run while the first trains, a workdir reused
for another network) are in test_train.py; a SIGKILLed owner's workdir is
resumed at once throughout test_kill_resume.py.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from alexnet_jax import workdir as workdir_lib


def _record(workdir):
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE)) as f:
    return json.load(f)


def _write_record(workdir, **fields):
  """The record another run would write: in one write of the fixed size,
  as `workdir._Lock` writes it, never truncated first (a reader that met
  the empty file between a truncation and the write would see no owner)."""
  os.makedirs(workdir, exist_ok=True)
  data = json.dumps({'started': '2026-01-01T00:00:00', 'command': 'train',
                     **fields}).encode().ljust(workdir_lib.RECORD_BYTES)
  fd = os.open(os.path.join(workdir, workdir_lib.LOCK_FILE),
               os.O_WRONLY | os.O_CREAT, 0o644)
  try:
    os.pwrite(fd, data, 0)
  finally:
    os.close(fd)


def _dead_pid():
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def test_second_owner_is_refused_with_the_first_named(tmp_path):
  workdir = str(tmp_path / 'run')
  with workdir_lib.owned(workdir):
    record = _record(workdir)
    assert record['pid'] == os.getpid()
    assert record['host'] == socket.gethostname()
    assert not record.get('released')
    # Another open of the file is another flock owner, as another process's
    # would be.
    with pytest.raises(workdir_lib.WorkdirBusyError) as error:
      with workdir_lib.owned(workdir):
        pass
    message = str(error.value)
    assert f'process {os.getpid()} on host {socket.gethostname()}' in message
    assert '--workdir' in message and workdir in message
  assert _record(workdir)['released']
  with workdir_lib.owned(workdir):  # released: the next run takes it
    assert _record(workdir)['pid'] == os.getpid()


def test_record_of_a_dead_process_on_this_host_does_not_hold(tmp_path):
  # SIGKILL or power loss leave the record unreleased; its pid is gone.
  workdir = str(tmp_path)
  _write_record(workdir, host=socket.gethostname(), pid=_dead_pid(),
                heartbeat=time.time())
  with workdir_lib.owned(workdir):
    assert _record(workdir)['pid'] == os.getpid()


def test_record_of_a_reused_pid_does_not_hold(tmp_path):
  # The pid is alive (this process), but it started at another time: the
  # owner died and its pid was given to someone else.
  workdir = str(tmp_path)
  _write_record(workdir, host=socket.gethostname(), pid=os.getpid(),
                pid_start='1', heartbeat=time.time())
  with workdir_lib.owned(workdir):
    assert _record(workdir)['pid_start'] != '1'


def test_live_owner_on_this_host_holds_without_a_flock(tmp_path):
  # Filesystems whose flocks other clients do not see: the record decides.
  workdir = str(tmp_path)
  _write_record(workdir, host=socket.gethostname(), pid=os.getppid(),
                pid_start=workdir_lib._process_start(os.getppid()),
                heartbeat=time.time())
  with pytest.raises(workdir_lib.WorkdirBusyError,
                     match=f'process {os.getppid()} on host '):
    with workdir_lib.owned(workdir):
      pass


def _other_host(workdir, age):
  _write_record(workdir, host='another-host.example', pid=1,
                heartbeat=time.time() - age)


def test_owner_on_another_host_with_a_stale_heartbeat_does_not_hold(tmp_path):
  workdir = str(tmp_path)
  _other_host(workdir, workdir_lib.STALE_SECONDS + 5)
  with workdir_lib.owned(workdir):
    assert _record(workdir)['host'] == socket.gethostname()


@pytest.fixture
def fast_heartbeat(monkeypatch):
  monkeypatch.setattr(workdir_lib, 'HEARTBEAT_SECONDS', 0.2)
  monkeypatch.setattr(workdir_lib, 'STALE_SECONDS', 1.0)


def test_owner_on_another_host_that_beats_holds(tmp_path, fast_heartbeat):
  workdir = str(tmp_path)
  _other_host(workdir, 0)
  stop = threading.Event()

  def beat():  # the other host's run, alive
    while not stop.wait(0.1):
      _other_host(workdir, 0)

  beating = threading.Thread(target=beat)
  beating.start()
  try:
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match='on host another-host.example'):
      with workdir_lib.owned(workdir):
        pass
  finally:
    stop.set()
    beating.join()


def test_owner_on_another_host_that_stopped_beating_is_waited_out(
    tmp_path, fast_heartbeat):
  # A run killed on another node moments ago: its heartbeat is fresh, but
  # never beats again; a job requeued here takes over once it is stale.
  workdir = str(tmp_path)
  _other_host(workdir, 0)
  started = time.monotonic()
  with workdir_lib.owned(workdir):
    assert _record(workdir)['host'] == socket.gethostname()
  assert 0.5 < time.monotonic() - started < 10


def test_heartbeat_is_renewed(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, 'HEARTBEAT_SECONDS', 0.05)
  workdir = str(tmp_path)
  with workdir_lib.owned(workdir):
    first = _record(workdir)['heartbeat']
    deadline = time.time() + 10
    while _record(workdir)['heartbeat'] == first:
      assert time.time() < deadline, 'no heartbeat written'
      time.sleep(0.02)


def test_a_cut_short_record_does_not_hold(tmp_path):
  workdir = str(tmp_path)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), 'w') as f:
    f.write('{"host": "h')
  with workdir_lib.owned(workdir):
    assert _record(workdir)['pid'] == os.getpid()
