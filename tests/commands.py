"""The environment in which tests run the project's commands as children."""

import os
import socket
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_env(**extra: str) -> dict[str, str]:
  """This process's environment for a command: the CPU, XLA's optimisation
  passes off as in conftest.py (they cost more than they save on runs this
  short), the repository importable, and no forced device count (a command's
  config asks runtime.setup for its own); then `extra`."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_DISABLE_MOST_OPTIMIZATIONS='true', PYTHONPATH=REPO_ROOT)
  env.pop('XLA_FLAGS', None)
  env.pop('JAX_NUM_CPU_DEVICES', None)
  env.update(extra)
  return env


def start_two_processes(flags, logs, env) -> list[subprocess.Popen]:
  """Starts processes 0 and 1 of one `alexnet_jax.main` run joined over
  loopback, each writing to its log and in its own process group (so a test
  can signal one, or kill everything it started)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'w') as out:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'alexnet_jax.main',
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
           f'--process_id={i}', *flags],
          cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
          start_new_session=True))
  return procs
